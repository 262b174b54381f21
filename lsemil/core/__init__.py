"""lsemil.core."""
