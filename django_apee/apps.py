"""The app config: system checks, metrics series and the CACHES change hook."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class ApeeConfig(AppConfig):  # type: ignore[misc]
    """Registers the management command, the system checks and the metrics."""

    name = "django_apee"
    verbose_name = "django-apee"

    def ready(self) -> None:
        from django.conf import settings
        from django.core.signals import request_finished
        from django.test.signals import setting_changed

        from django_apee import checks
        from django_apee.conf import apee_aliases, parse
        from django_apee.observe import metrics

        checks.register()
        if _debug_toolbar_panel_configured(settings):
            from django_apee.observe import trace

            trace.enable()
        setting_changed.connect(_caches_changed, dispatch_uid="django_apee.metrics")
        request_finished.connect(_settle_counts, dispatch_uid="django_apee.settle")
        metrics.use_django_prometheus(django_prometheus_counters())
        for alias in apee_aliases(settings.CACHES):
            options, _ = parse(settings.CACHES[alias].get("OPTIONS") or {})
            metrics.configure(alias, enabled=options.metrics)
            metrics.initialise(alias)


def _settle_counts(**kwargs: Any) -> None:
    """The request's plain gets, ticked on the hit path, into the counters:
    prometheus_client's multiprocess mode reads them from each worker's
    files, where only a counter's ``inc`` puts them."""
    from django_apee.observe import metrics

    metrics.settle()


def _caches_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "CACHES":
        from django_apee import runtime

        runtime.forget_all()


def _debug_toolbar_panel_configured(settings: Any) -> bool:
    """Whether DEBUG_TOOLBAR_PANELS lists our panel (contrib/debug_toolbar.py).

    Tracing must be on before an alias's runtime is built; turning it on only
    here leaves sites without the panel with the bare metrics on the hit path.
    """
    panels = getattr(settings, "DEBUG_TOOLBAR_PANELS", None) or ()
    return "django_apee.contrib.debug_toolbar.ApeePanel" in panels


def django_prometheus_counters() -> tuple[Any, Any, Any] | None:
    """django-prometheus's own get/hit/miss counters, if it is installed.

    Its module defines them on the default registry; reusing its objects
    (rather than registering the same names again) lets dashboards built on
    ``django_cache_get_*`` keep working after the swap.
    """
    try:
        from django_prometheus.cache import metrics as theirs
    except ImportError:
        return None
    return (
        theirs.django_cache_get_total,
        theirs.django_cache_hits_total,
        theirs.django_cache_misses_total,
    )
