"""lsemil.runtime."""
