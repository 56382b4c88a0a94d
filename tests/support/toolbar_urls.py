"""URLs for the django-debug-toolbar panel test: the toolbar's and one view."""

from django.core.cache import caches
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, URLResolver, include, path

from django_apee import get_or_set_stampede_safe


def report(request: HttpRequest) -> HttpResponse:
    """Two plain gets of a stale entry (a herd miss, then the value: this
    process holds the refresh), the winner's set, then two stampede-safe
    calls of one key: the first computes, the second hits."""
    menu = caches["toolbar"].get("toolbar-menu", "missed")
    again = caches["toolbar"].get("toolbar-menu", "missed")
    caches["toolbar"].set("toolbar-menu", "new menu", 20)
    first = get_or_set_stampede_safe(
        "toolbar-report", lambda: "computed", 60, cache="toolbar"
    )
    second = get_or_set_stampede_safe(
        "toolbar-report", lambda: "again", 60, cache="toolbar"
    )
    return HttpResponse(
        f"<html><body><p>{menu} {again} {first} {second}</p></body></html>"
    )


async def async_report(request: HttpRequest) -> HttpResponse:
    """A plain aget of a stale entry (a herd miss), one stampede-safe call."""
    menu = await caches["toolbar"].aget("toolbar-amenu", "missed")
    value = await caches["toolbar"].aget_or_set_stampede_safe(
        "toolbar-async", lambda: "computed", 60
    )
    return HttpResponse(f"<html><body><p>{menu} {value}</p></body></html>")


urlpatterns: list[URLPattern | URLResolver] = [
    path("report/", report),
    path("async-report/", async_report),
    path("__debug__/", include("debug_toolbar.urls")),
]
