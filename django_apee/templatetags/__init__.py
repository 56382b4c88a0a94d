"""Template libraries of django-apee: ``{% load apee %}``."""
