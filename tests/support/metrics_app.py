"""A Django project for the gunicorn metrics test: cache views and /metrics.

Served by ``gunicorn tests.support.metrics_app:application`` with
``DJANGO_SETTINGS_MODULE=tests.support.metrics_app`` (this module is its own settings
and URLconf) and ``PROMETHEUS_MULTIPROC_DIR`` set, so the /metrics view
(``django_apee.contrib.prometheus``, prometheus_client alone) sums every
worker's counters.
"""

from __future__ import annotations

import os
import time

from tests.settings import *  # noqa: F403  # the session's Redis and database

ROOT_URLCONF = "tests.support.metrics_app"


def get_view(request):  # type: ignore[no-untyped-def]
    """One plain ``cache.get``; answers which worker served it."""
    from django.core.cache import cache
    from django.http import JsonResponse

    found = cache.get(request.GET["key"])
    return JsonResponse({"pid": os.getpid(), "found": found})


def rendezvous_view(request):  # type: ignore[no-untyped-def]
    """Hold this (sync) worker until ``n`` requests have arrived, then get.

    With one request per worker at a time, ``n`` concurrent rendezvous
    requests must be served by ``n`` different workers.
    """
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
    client.incr("rendezvous")
    deadline = time.monotonic() + 20
    while int(client.get("rendezvous") or 0) < int(request.GET["n"]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    client.close()
    return get_view(request)


def health_view(request):  # type: ignore[no-untyped-def]
    from django.http import HttpResponse

    return HttpResponse("ok")


def _urls() -> list[object]:
    from django.urls import path

    from django_apee.contrib.prometheus import metrics_view

    return [
        path("get", get_view),
        path("rendezvous", rendezvous_view),
        path("health", health_view),
        path("metrics", metrics_view),
    ]


urlpatterns = _urls()


def _application() -> object:
    # Django's setup imports this module as its settings: by now every
    # setting above exists, so the partly imported module serves.
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


application = _application()
