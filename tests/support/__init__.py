"""Helpers shared by the tests: servers, child-process entry points, views."""
