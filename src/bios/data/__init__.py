"""Data files shipped with the SDK (the demo dataset)."""
