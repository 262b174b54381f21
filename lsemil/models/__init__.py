"""lsemil.models."""
