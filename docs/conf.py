"""Sphinx configuration for the django-apee documentation.

Built warning-free by ``scripts/test -e docs`` (``sphinx-build -W``). The
version comes from the installed package so it is written in one place
(``django_apee/__init__.py``).
"""

from __future__ import annotations

import django
from django.conf import settings

# autodoc imports the package, and some modules read Django settings at import
# time; a minimal configuration is enough for that.
if not settings.configured:
    settings.configure(
        SECRET_KEY="docs",  # noqa: S106 - only to import modules for autodoc
        INSTALLED_APPS=["django_apee"],
        CACHES={"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}},
    )
    django.setup()

import django_apee

project = "django-apee"
author = "the django-apee developers"
copyright = "2026, the django-apee developers"
release = django_apee.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

# Every page is reached from a toctree; benchmark tables that bench/charts.py
# writes next to the charts are raw output, not pages.
exclude_patterns = ["_build", "bench/*.rst", "bench/*.md"]
root_doc = "index"
nitpicky = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Pages list the members they document; defaults as written in the source
# (DEFAULT_TIMEOUT, not "<object object>").
autodoc_preserve_defaults = True

html_theme = "furo"
html_title = f"django-apee {release}"
