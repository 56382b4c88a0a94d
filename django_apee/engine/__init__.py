"""Stampede-safe computation and herd mode, over the store's small protocol."""
