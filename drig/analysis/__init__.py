"""drig.analysis."""
