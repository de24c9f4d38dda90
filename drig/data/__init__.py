"""drig.data."""
