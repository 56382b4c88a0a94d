"""Settings for running Django's own cache tests against ApeeCache.

Django's tests import themselves as the ``cache`` app (models and all); they
are fetched for the installed Django version on first use, into
``APEE_DJANGO_TESTS_CACHE`` (default ``.cache/django-tests``).
"""

import os
import sys
from pathlib import Path

from tests.conformance.fetch import fetch
from tests.settings import *  # noqa: F403
from tests.settings import INSTALLED_APPS

_cache_dir = os.environ.get("APEE_DJANGO_TESTS_CACHE", ".cache/django-tests")
sys.path.insert(0, str(fetch(Path(_cache_dir))))

INSTALLED_APPS = [*INSTALLED_APPS, "cache"]
USE_TZ = False
