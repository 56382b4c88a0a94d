from django.apps import AppConfig


class ApeeConfig(AppConfig):  # type: ignore[misc]
    """Registers the template library, the management command and the checks."""

    name = "django_apee"
    verbose_name = "django-apee"
