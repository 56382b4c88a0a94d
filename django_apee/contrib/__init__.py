"""Integrations with other Django packages, each used only when installed."""
