from typing import Any

from django.apps import AppConfig


class ApeeConfig(AppConfig):  # type: ignore[misc]
    """Registers the management command, the system checks and the metrics."""

    name = "django_apee"
    verbose_name = "django-apee"

    def ready(self) -> None:
        from django.conf import settings
        from django.test.signals import setting_changed

        from django_apee import checks
        from django_apee.observe import metrics

        checks.register()
        setting_changed.connect(_caches_changed, dispatch_uid="django_apee.metrics")
        for alias in apee_aliases(settings.CACHES):
            metrics.initialise(alias)


def apee_aliases(caches: dict[str, Any]) -> list[str]:
    """The CACHES aliases whose BACKEND is ApeeCache (by dotted path)."""
    return [
        alias
        for alias, config in caches.items()
        if str(config.get("BACKEND", "")).startswith("django_apee.")
    ]


def _caches_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "CACHES":
        from django_apee.observe import metrics

        metrics.reset()
