"""Tests against the session's one private redis-server (``tests/settings.py``)."""
