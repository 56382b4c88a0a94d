"""The django-debug-toolbar panel, rendered by the real toolbar for a request.

The toolbar middleware runs around a view that makes two stampede-safe calls
of one key on a fresh alias (its runtime is built inside the request, after
the panel turned tracing on): the panel must list both, the first as a miss
this request computed, the second as a fresh hit.
"""

from __future__ import annotations

import re

import pytest
from django.conf import settings
from django.core.cache import caches
from django.test import Client
from django.test.utils import override_settings

pytest.importorskip("debug_toolbar")

from django_apee.contrib.debug_toolbar import PANEL_PATH


def show_toolbar(request: object) -> bool:
    return True


def test_toolbar_panel_shows_each_stampede_safe_call(redis_url):
    caches_config = {
        **settings.CACHES,
        "toolbar": {"BACKEND": "django_apee.cache.ApeeCache", "LOCATION": redis_url,
                    "KEY_PREFIX": "djdt"},
    }  # fmt: skip
    with override_settings(
        DEBUG=True,
        INSTALLED_APPS=[
            *settings.INSTALLED_APPS,
            "django.contrib.staticfiles",
            "debug_toolbar",
        ],
        MIDDLEWARE=["debug_toolbar.middleware.DebugToolbarMiddleware"],
        ROOT_URLCONF="tests.support.toolbar_urls",
        CACHES=caches_config,
        DEBUG_TOOLBAR_PANELS=[PANEL_PATH, "debug_toolbar.panels.cache.CachePanel"],
        DEBUG_TOOLBAR_CONFIG={
            "SHOW_TOOLBAR_CALLBACK": "tests.redis.test_debug_toolbar.show_toolbar",
            "RENDER_PANELS": True,
        },
    ):
        caches["toolbar"].delete("toolbar-report")
        response = Client().get("/report/")
        assert response.status_code == 200
        html = response.content.decode()
    assert "<p>computed computed</p>" in html
    panel = html[html.index('id="ApeePanel"') :]
    assert "Stampede-safe calls (2)" in panel
    rows = re.findall(r"<tr><td>toolbar</td><td><code>([^<]+)</code></td>"
                      r"<td>(\w+)</td><td>(\w+)</td>", panel)  # fmt: skip
    assert rows == [
        ("djdt:1:toolbar-report", "miss", "compute"),
        ("djdt:1:toolbar-report", "fresh", "hit"),
    ]
    assert "2 calls, 1 computed, 0 lease waits" in html  # the nav subtitle
