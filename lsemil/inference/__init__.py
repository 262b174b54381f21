"""lsemil.inference.engine."""
