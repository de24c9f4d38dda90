"""drig.models."""
