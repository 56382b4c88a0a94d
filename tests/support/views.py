"""Views of the test suite's request-level tests (ASGI, sessions, cache_page).

Each view that stands for expensive work records its runs in an
``Executions`` log, so a test counts how often the work really ran, not how
often it was asked for. The live server runs in the test process, so a
module-level log with a lock sees every run.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.core.cache import caches
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template import loader
from django.views.decorators.cache import cache_page

#: How long a cached page lives, in seconds (``test_cache_page.py``).
PAGE_TIMEOUT = 3
#: What one run of a page "costs": long enough for concurrent requests to
#: pile up behind an expired page, short next to the stale window.
PAGE_WORK_S = 0.05
#: Cache aliases the page views use; the tests define them in CACHES.
APEE_PAGES = "pages_apee"
PLAIN_PAGES = "pages_plain"
#: The key and compute time of the ASGI view's value.
REPORT_KEY = "asgi:report"
REPORT_WORK_S = 0.3


@dataclass(frozen=True)
class Run:
    """One run of a view's work: its number and when it started and ended."""

    number: int
    started: float
    ended: float


class Executions:
    """A thread-safe log of a view's runs, cleared by each test."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: list[Run] = []
        self._next = 0

    def start(self) -> tuple[int, float]:
        """Number this run (1, 2, ...) and note when it started."""
        with self._lock:
            self._next += 1
            return self._next, time.monotonic()

    def finish(self, number: int, started: float) -> None:
        with self._lock:
            self._runs.append(Run(number, started, time.monotonic()))

    def runs(self) -> list[Run]:
        with self._lock:
            return sorted(self._runs, key=lambda run: run.started)

    def count(self) -> int:
        with self._lock:
            return self._next

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()
            self._next = 0


PAGE_RUNS = Executions()
REPORT_RUNS = Executions()
FRAGMENT_RUNS = Executions()


# -- ASGI: an async view on the stampede-safe path --------------------------------


def build_report() -> dict[str, object]:
    """The expensive value behind ``async_report``; runs in a worker thread."""
    number, started = REPORT_RUNS.start()
    time.sleep(REPORT_WORK_S)  # the compute's cost; the count is what is asserted
    REPORT_RUNS.finish(number, started)
    return {"report": 42, "run": number}


async def async_report(request: HttpRequest) -> JsonResponse:
    value = await caches["default"].aget_or_set_stampede_safe(
        REPORT_KEY, build_report, 30
    )
    return JsonResponse(value)


def _fragment_probe() -> str:
    """The expensive part of a template fragment (called by ``{{ probe }}``)."""
    number, started = FRAGMENT_RUNS.start()
    time.sleep(REPORT_WORK_S)
    FRAGMENT_RUNS.finish(number, started)
    return f"run {number}"


async def async_fragment(request: HttpRequest, tag: str) -> HttpResponse:
    """An async view whose template caches a fragment with ``{% apee_cache %}``
    (``tag`` "apee") or Django's ``{% cache %}`` ("django"), rendered in
    worker threads (``thread_sensitive=False``: concurrent requests render at
    the same time, as a site's async views may)."""
    template = loader.get_template(f"apee_tests/stampede_{tag}.html")
    context = {"probe": _fragment_probe, "alias": "default"}
    render = sync_to_async(template.render, thread_sensitive=False)
    return HttpResponse(await render(context, request))


# -- sessions ----------------------------------------------------------------------


def whoami(request: HttpRequest) -> JsonResponse:
    """Who the session says this is, and what a child process wrote into it."""
    return JsonResponse(
        {
            "pk": request.user.pk,  # type: ignore[attr-defined]
            "from_child": request.session.get("from_child"),  # type: ignore[attr-defined]
        }
    )


# -- cache_page ---------------------------------------------------------------------


def page(request: HttpRequest) -> HttpResponse:
    """A page whose body names the run that rendered it."""
    number, started = PAGE_RUNS.start()
    time.sleep(PAGE_WORK_S)  # the page's work; runs are counted, not timed
    PAGE_RUNS.finish(number, started)
    response = HttpResponse(f"page run {number}", content_type="text/plain")
    response["X-Page-Run"] = str(number)
    return response


apee_page = cache_page(PAGE_TIMEOUT, cache=APEE_PAGES)(page)
plain_page = cache_page(PAGE_TIMEOUT, cache=PLAIN_PAGES)(page)


@cache_page(60, cache=APEE_PAGES)
def rich_page(request: HttpRequest) -> HttpResponse:
    """A page with the parts a cached response must keep: headers, charset, bytes."""
    number, started = PAGE_RUNS.start()
    PAGE_RUNS.finish(number, started)
    response = HttpResponse(
        f"Grüße, run {number} \u2603".encode("utf-16"),
        content_type="text/plain; charset=utf-16",
    )
    response["X-Custom"] = "kept"
    response["Content-Language"] = "de"
    return response
