"""The demo shop's pages, each showing one way django-apee is used.

* ``report_json`` / ``report_page``: a value cached with
  ``get_or_set_stampede_safe`` (``caching.cached``): the page the demo's
  load hits.
* ``category_page``: a function cached with ``@stampede_safe``.
* ``home``: template fragments, one with Django's ``{% cache %}`` and one
  with ``{% apee_cache %}``; a visit counter in the session (sessions live
  in the cache).
* ``about``: a whole page cached with ``cache_page``.
* ``report_async``: the report from an ``async def`` view under ASGI
  (``aget_or_set_stampede_safe``: the waiting requests hold no thread).
"""

from __future__ import annotations

import os
import time
from typing import Any

from django.conf import settings
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import cache_page

from shop import reports
from shop.caching import cached, cached_function, stampede_safe_available
from shop.models import Category, Customer

#: The sales report's hard and soft timeouts, seconds. The demo driver sets
#: short ones so that its load sees the entry expire several times.
REPORT_TIMEOUT = float(os.environ.get("DEMO_REPORT_TIMEOUT", "60"))
REPORT_SOFT = float(os.environ.get("DEMO_REPORT_SOFT", str(REPORT_TIMEOUT * 0.8)))


def sales_report() -> dict[str, Any]:
    return cached("sales_report", reports.sales_report, REPORT_TIMEOUT, REPORT_SOFT)


@cached_function(timeout=120, soft=100)
def top_products(category_id: int) -> list[dict[str, Any]]:
    return reports.top_products(category_id)


def backend_name() -> str:
    return "django-apee" if stampede_safe_available() else "django-redis (naive)"


def report_json(request: HttpRequest) -> JsonResponse:
    """The report as JSON, with the worker that served it."""
    return JsonResponse({**sales_report(), "pid": os.getpid()})


def report_page(request: HttpRequest) -> HttpResponse:
    report = sales_report()
    context = {
        "report": report,
        "age": time.time() - report["computed_at"],
        "backend": backend_name(),
        "timeout": REPORT_TIMEOUT,
        "soft": REPORT_SOFT,
    }
    return render(request, "shop/report.html", context)


def category_page(request: HttpRequest, category_id: int) -> HttpResponse:
    category = Category.objects.filter(pk=category_id).first()
    if category is None:
        raise Http404("no such category")
    context = {"category": category, "products": top_products(category_id)}
    return render(request, "shop/category.html", context)


def country_summary() -> list[dict[str, Any]]:
    """Customers and orders per country: rendered inside ``{% apee_cache %}``."""
    return list(
        Customer.objects.values("country")
        .annotate(customers=Count("id", distinct=True), orders=Count("order"))
        .order_by("-orders")
    )


def home(request: HttpRequest) -> HttpResponse:
    request.session["visits"] = request.session.get("visits", 0) + 1
    context = {
        "backend": backend_name(),
        "visits": request.session["visits"],
        # Lazy: evaluated only when a fragment is rendered, not on a hit.
        "categories": Category.objects.all(),
        "countries": country_summary,
        "rendered_at": time.time(),
        "redis_url": settings.REDIS_URL,
    }
    return render(request, "shop/home.html", context)


@cache_page(30)
def about(request: HttpRequest) -> HttpResponse:
    return render(request, "shop/about.html", {"rendered_at": time.time()})


async def report_async(request: HttpRequest) -> JsonResponse:
    """The report from an async view (``demo.asgi`` under uvicorn).

    On apee: ``aget_or_set_stampede_safe``, computed once per expiry while
    the other requests wait on the event loop. On naive: the async
    cache-aside such views are written with (``aget``; on a miss, compute in
    a thread and ``aset``), so every request that misses computes.
    """
    from asgiref.sync import sync_to_async
    from django.core.cache import cache

    from django_apee import aget_or_set_stampede_safe

    key = "shop:report:async"
    if stampede_safe_available():
        report = await aget_or_set_stampede_safe(
            key, reports.sales_report, REPORT_TIMEOUT, soft_timeout=REPORT_SOFT
        )
    else:
        report = await cache.aget(key)
        if report is None:
            report = await sync_to_async(reports.sales_report)()
            await cache.aset(key, report, REPORT_TIMEOUT)
    return JsonResponse({**report, "pid": os.getpid()})
