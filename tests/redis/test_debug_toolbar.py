"""The django-debug-toolbar panel, rendered by the real toolbar for a request.

The toolbar middleware runs around a view that reads a stale entry twice
with a plain get and makes two stampede-safe calls of one key, on a fresh
alias (its runtime is built inside the request, after the panel turned
tracing on): the panel must list both herd decisions with their key (a herd
miss, then the value served while this process holds the refresh), and both
calls, the first as a miss this request computed, the second as a fresh hit.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import threading
import time

import pytest
from django.conf import settings
from django.core.cache import caches
from django.test import Client
from django.test.utils import override_settings

pytest.importorskip("debug_toolbar")

from django_apee import get_or_set_stampede_safe
from django_apee.apps import _debug_toolbar_panel_configured
from django_apee.contrib.debug_toolbar import PANEL_PATH
from django_apee.core import decisions
from django_apee.observe import trace


def show_toolbar(request: object) -> bool:
    return True


def toolbar_settings(redis_url: str) -> override_settings:
    caches_config = {
        **settings.CACHES,
        # Soft timeouts at 5 % of the timeout: a plain set's entry is stale
        # (herd mode's window) a second in, and a stampede-safe one written
        # in the request (60 s, soft 3 s) is still fresh when read again.
        "toolbar": {"BACKEND": "django_apee.cache.ApeeCache", "LOCATION": redis_url,
                    "KEY_PREFIX": "djdt", "OPTIONS": {"SOFT_TIMEOUT_RATIO": 0.05}},
    }  # fmt: skip
    return override_settings(
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
    )


def test_toolbar_panel_shows_each_stampede_safe_call(redis_url):
    with toolbar_settings(redis_url):
        # What django_apee's app config does at start-up when the panel is
        # configured (here the settings changed after start-up), before the
        # alias's runtime is built by its first use.
        assert _debug_toolbar_panel_configured(settings)
        trace.enable()
        caches["toolbar"].delete("toolbar-report")
        caches["toolbar"].set("toolbar-menu", "menu", 20)
        time.sleep(1.3)  # past its soft timeout (1 s), far from its timeout
        response = Client().get("/report/")
        assert response.status_code == 200
        html = response.content.decode()
    assert "<p>missed menu computed computed</p>" in html  # the herd miss was ours
    panel = html[html.index('id="ApeePanel"') :]
    assert "Stampede-safe calls (2)" in panel
    rows = re.findall(r"<tr><td>toolbar</td><td><code>([^<]+)</code></td>"
                      r"<td>(\w+)</td><td>(\w+)</td>", panel)  # fmt: skip
    assert rows == [
        ("djdt:1:toolbar-report", "miss", "compute"),
        ("djdt:1:toolbar-report", "fresh", "hit"),
    ]
    assert "2 calls, 1 computed, 0 waits, 2 herd decisions" in html  # nav subtitle
    herd_table = panel[panel.index("Herd decisions of plain gets (2)") :]
    herd = re.findall(r"<tr><td>toolbar</td><td><code>([^<]+)</code></td>"
                      r"<td>(\w+)</td><td>([^<]+)</td>", herd_table)  # fmt: skip
    assert herd == [
        ("djdt:1:toolbar-menu", "stale", decisions.HERD_MISS),
        ("djdt:1:toolbar-menu", "stale", decisions.SERVED_CLAIMED),
    ]


def test_toolbar_panel_records_an_async_views_calls(redis_url):
    """The recording travels with the request's context into the worker
    thread ``aget_or_set_stampede_safe`` runs in; an ``aget``'s herd
    decision is recorded with its key."""
    from django.test import AsyncClient

    async def fetch() -> str:
        response = await AsyncClient().get("/async-report/")
        assert response.status_code == 200
        return str(response.content.decode())

    with toolbar_settings(redis_url):
        trace.enable()
        caches["toolbar"].delete("toolbar-async")
        caches["toolbar"].set("toolbar-amenu", "menu", 20)
        time.sleep(1.3)  # past its soft timeout (1 s), far from its timeout
        html = asyncio.run(fetch())
    assert "<p>missed computed</p>" in html
    panel = html[html.index('id="ApeePanel"') :]
    assert "Stampede-safe calls (1)" in panel
    assert (
        "<td>toolbar</td><td><code>djdt:1:toolbar-async</code></td>"
        "<td>miss</td><td>compute</td>"
    ) in panel
    assert (
        "<td>toolbar</td><td><code>djdt:1:toolbar-amenu</code></td>"
        f"<td>stale</td><td>{decisions.HERD_MISS}</td>"
    ) in panel


def test_a_wait_for_this_processs_own_computation_is_on_its_call(redis_url):
    """A stampede-safe call that joins the computation another thread of the
    process runs for its key (single-flight, no Redis lease) lists that wait,
    with its time, on its own call: the key is the call's."""
    with toolbar_settings(redis_url):
        trace.enable()
        caches["toolbar"].delete("toolbar-slow")
        computing = threading.Event()

        def compute() -> str:
            computing.set()
            time.sleep(0.3)
            return "slow"

        def call() -> object:
            return get_or_set_stampede_safe(
                "toolbar-slow", compute, 60, cache="toolbar"
            )

        recording = trace.start()
        try:
            leader = threading.Thread(
                target=contextvars.copy_context().run, args=(call,)
            )
            leader.start()
            assert computing.wait(5)
            assert call() == "slow"  # joins the leader's flight
            leader.join(5)
        finally:
            trace.stop()
    by_outcome = {c.outcome: c for c in recording.calls}
    assert sorted(by_outcome) == ["compute", "miss"]
    follower = by_outcome["miss"]
    assert follower.key == "djdt:1:toolbar-slow"
    assert len(follower.process_waits) == 1
    assert 0.1 < follower.process_waits[0] < 5
    assert follower.waits == []  # no Redis lease was waited for
    assert by_outcome["compute"].process_waits == []
