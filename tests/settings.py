"""Django settings for the test suite.

Reading it starts the session's private redis-server (or takes ``REDIS_URL``),
and with ``APEE_TEST_CLUSTER=1`` a 6-node Redis Cluster for the caches
(``tests/support/target.py``): Django loads settings before any conftest
runs. The database is an SQLite file, not ``:memory:``, so that child
processes (multi-process tests) see the tables and rows the test process made.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from tests.support import target
from tests.support.redis_server import session_url

#: The session's single server. With APEE_TEST_CLUSTER=1 the caches are on a
#: cluster instead (``tests/support/target.py``); this one stays for the tests
#: that need a plain server beside it.
REDIS_URL = session_url()


def _database_path() -> str:
    """One SQLite file per test session, shared with its child processes."""
    path = os.environ.get("APEE_TEST_DB")
    if not path:
        directory = tempfile.mkdtemp(prefix="django-apee-tests-")
        atexit.register(shutil.rmtree, directory, True)
        path = os.environ["APEE_TEST_DB"] = os.path.join(directory, "db.sqlite3")
    return path


SECRET_KEY = "django-apee-tests-not-a-secret"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django_apee",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": _database_path(),
        "TEST": {"NAME": _database_path()},
    }
}
CACHES = {"default": target.cache_config()}
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [Path(__file__).resolve().parent / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": ["django.template.context_processors.request"]
        },
    }
]
ROOT_URLCONF = "tests.support.urls"
#: The live server wraps the site in a static-files handler, which needs it.
STATIC_URL = "/static/"
MIDDLEWARE: list[str] = []
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
