"""lsemil.workflows."""
