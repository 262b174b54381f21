"""lsemil.reporting."""
