"""drig.training."""
