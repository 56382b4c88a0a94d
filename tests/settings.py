"""Django settings for the test suite.

Reading it starts the session's private redis-server (or takes ``REDIS_URL``):
Django loads settings before any conftest runs.
"""

from tests.redis_server import session_url

REDIS_URL = session_url()

SECRET_KEY = "django-apee-tests-not-a-secret"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django_apee",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
CACHES = {
    "default": {"BACKEND": "django_apee.cache.ApeeCache", "LOCATION": REDIS_URL},
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
