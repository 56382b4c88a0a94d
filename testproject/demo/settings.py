"""Settings of the demo site.

Environment:

* ``REDIS_URL``: the Redis the caches use (default ``redis://127.0.0.1:6379/0``).
* ``DEMO_CACHE``: ``apee`` (default) runs the site on django-apee's
  ``ApeeCache``; ``naive`` runs the very same site on plain django-redis, for
  the comparison ``scripts/demo`` prints.
* ``DATABASE_URL``: ``postgres://user:password@host:port/name`` (needs
  psycopg installed) or ``sqlite:///path``; default an SQLite file next to
  ``manage.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DEMO_CACHE = os.environ.get("DEMO_CACHE", "apee")
if DEMO_CACHE not in ("apee", "naive"):
    raise ValueError(f"DEMO_CACHE must be 'apee' or 'naive', not {DEMO_CACHE!r}")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "django_apee",
    "shop.apps.ShopConfig",
]
MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]
ROOT_URLCONF = "demo.urls"
WSGI_APPLICATION = "demo.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]


def database(url: str | None) -> dict[str, Any]:
    """``DATABASES["default"]`` from a ``DATABASE_URL`` (two schemes, no extras).

    Parsed here rather than with dj-database-url: two schemes take a dozen
    lines, and the demo installs nothing it can do without.
    """
    if not url:
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": BASE_DIR / "demo.sqlite3",
        }
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": parts.path[1:]}
    if parts.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parts.path[1:]),
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
        }
    raise ValueError(f"DATABASE_URL: unsupported scheme {parts.scheme!r}")


DATABASES = {"default": database(os.environ.get("DATABASE_URL"))}

if DEMO_CACHE == "apee":
    CACHES = {
        "default": {
            "BACKEND": "django_apee.cache.ApeeCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "demo",
            # The demo reads apee_stats right after its load: flush the fleet
            # counters every second rather than every five.
            "OPTIONS": {"STATS_FLUSH_INTERVAL": 1.0},
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            # Another prefix: django-redis's pickles and apee's envelopes
            # never meet under one key when you switch back and forth.
            "KEY_PREFIX": "demo-naive",
        }
    }
SESSION_ENGINE = "django.contrib.sessions.backends.cache"
STATIC_URL = "static/"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
