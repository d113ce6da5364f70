"""dblock.functional.blocks."""
