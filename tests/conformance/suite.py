"""Django's ``BaseCacheTests``, run against ApeeCache with default options,
and again with the near cache on.

Collected only when named on the command line with the conformance settings
(see the README's test command); ``fetch.py`` provides Django's tests. Tests we
deliberately differ on are listed, with the reason, in ``DIFFERENCES`` below;
each is an expected failure, so a difference that stops differing fails the
run too.
"""

from __future__ import annotations

import os
import time
import unittest

from cache.tests import BaseCacheTests, caches_setting_for_tests  # type: ignore[import-not-found]
from django.conf import settings
from django.core.cache import caches
from django.test import TestCase, override_settings

#: test name -> why ApeeCache deliberately behaves differently. Keep it short.
DIFFERENCES: dict[str, str] = {}

#: Set APEE_CONFORMANCE_BACKEND (e.g. django_redis.cache.RedisCache) to run
#: the same suite against another backend for comparison. A settings module
#: may name another LOCATION and OPTIONS (``cluster_settings.py``: a cluster).
APEE = {
    "BACKEND": os.environ.get(
        "APEE_CONFORMANCE_BACKEND", "django_apee.cache.ApeeCache"
    ),
    "LOCATION": getattr(settings, "APEE_CONFORMANCE_LOCATION", settings.REDIS_URL),
    "OPTIONS": getattr(settings, "APEE_CONFORMANCE_OPTIONS", {}),
}


@override_settings(
    CACHES=caches_setting_for_tests(base=APEE, exclude={"cull", "zero_cull"})
)
class ApeeCacheConformanceTests(BaseCacheTests, TestCase):  # type: ignore[misc]
    """Every test Django applies to its own cache backends."""


for _name, _reason in DIFFERENCES.items():
    setattr(
        ApeeCacheConformanceTests,
        _name,
        unittest.expectedFailure(getattr(BaseCacheTests, _name)),
    )


@unittest.skipUnless(
    getattr(settings, "APEE_CONFORMANCE_NEAR", True),
    "no near cache on this deployment (ApeeClusterClient refuses it)",
)
@override_settings(
    CACHES=caches_setting_for_tests(
        base={**APEE, "OPTIONS": {**APEE["OPTIONS"], "NEAR_CACHE": True}},
        exclude={"cull", "zero_cull"},
    )
)
class ApeeNearCacheConformanceTests(BaseCacheTests, TestCase):  # type: ignore[misc]
    """The same tests with the near cache on: reads served from process
    memory must keep every promise a Redis read keeps."""

    def setUp(self) -> None:
        """Tracking up before each test, so its reads fill the near caches
        and its repeated reads are near hits (else most would go to Redis
        while the tracking connection of the test's new runtime comes up)."""
        super().setUp()
        if APEE["BACKEND"] == "django_apee.cache.ApeeCache":
            wait_for_tracking()


def wait_for_tracking() -> None:
    """Every alias's near cache confirmed by Redis (it serves nothing before)."""
    deadline = time.monotonic() + 10
    for alias in settings.CACHES:
        near = caches[alias].runtime.near
        near.tracker.ensure()
        while not near.tracker.live(time.monotonic()):
            assert time.monotonic() < deadline, "tracking never came up"
            time.sleep(0.002)


for _name, _reason in DIFFERENCES.items():
    setattr(
        ApeeNearCacheConformanceTests,
        _name,
        unittest.expectedFailure(getattr(BaseCacheTests, _name)),
    )
