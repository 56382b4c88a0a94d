"""A ``/metrics`` view on prometheus_client alone.

django-apee's metrics live on prometheus_client's default registry, so any
exporter of that registry serves them (django-prometheus's view among them).
This view is for sites that do not run django-prometheus: it needs nothing
but prometheus_client, a dependency of the package, and so installs on every
Django we support. Under gunicorn or uWSGI with ``PROMETHEUS_MULTIPROC_DIR``
set it sums every worker's files, as prometheus_client's multiprocess mode
requires (the default registry would show only the answering worker).

    # urls.py
    from django_apee.contrib.prometheus import metrics_view
    urlpatterns = [path("metrics", metrics_view)]

Protect it as you would any operational endpoint (it names your cache
aliases, never keys).
"""

from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)


def registry() -> CollectorRegistry:
    """The registry to export: every worker's in multiprocess mode, else ours."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        collected = CollectorRegistry()
        multiprocess.MultiProcessCollector(collected)  # type: ignore[no-untyped-call]
        return collected
    return REGISTRY


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus's text exposition of the registry (``registry()``)."""
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)
