"""dblock.launch."""
