"""lsemil.metrics.overlap."""
