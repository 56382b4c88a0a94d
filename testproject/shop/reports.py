"""The expensive work the demo caches: real aggregate queries, no sleep.

Every run of ``sales_report`` is counted in Redis (``RUNS_KEY``, a list of
start times) by the same code on both cache configurations, so the demo
driver can tell how many times the database really did the work.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import redis
from django.conf import settings
from django.db.models import Count, F, Sum

from shop.models import Category, OrderLine, Product

#: Redis list of the sales report's start times (Unix seconds), one per run.
RUNS_KEY = "demo:sales_report:runs"

_counter: redis.Redis | None = None


def record_run() -> int:
    """Append this run's start time to ``RUNS_KEY``; return its number (1, 2…)."""
    global _counter
    if _counter is None:
        _counter = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
    return int(_counter.rpush(RUNS_KEY, repr(time.time())))


def money(value: Decimal | None) -> str:
    return f"{value or 0:.2f}"


def sales_report() -> dict[str, Any]:
    """Revenue, units, orders and customers per category, over all order lines.

    One query joining four tables over a few hundred thousand rows with two
    distinct counts: hundreds of milliseconds on SQLite.
    """
    run = record_run()
    started = time.perf_counter()
    rows = list(
        OrderLine.objects.values(category=F("product__category__name"))
        .annotate(
            revenue=Sum(F("quantity") * F("unit_price")),
            units=Sum("quantity"),
            orders=Count("order", distinct=True),
            customers=Count("order__customer", distinct=True),
        )
        .order_by("-revenue", "category")
    )
    for row in rows:
        row["revenue"] = money(row["revenue"])
    return {
        "rows": rows,
        "run": run,
        "query_ms": round((time.perf_counter() - started) * 1000, 1),
        "computed_at": time.time(),
    }


def top_products(category_id: int, limit: int = 10) -> list[dict[str, Any]]:
    """Best sellers of one category (cached with ``@stampede_safe`` in views)."""
    rows = list(
        Product.objects.filter(category_id=category_id)
        .annotate(units=Sum("orderline__quantity"))
        .order_by("-units", "name")
        .values("id", "name", "price", "units")[:limit]
    )
    for row in rows:
        row["price"] = money(row["price"])
    return rows


def category_names() -> list[tuple[int, str]]:
    return list(Category.objects.values_list("id", "name"))
