"""dblock.training."""
