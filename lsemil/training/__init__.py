"""lsemil.training."""
