"""URLs of the test suite's request-level tests (``tests/support/views.py``)."""

from django.urls import URLPattern, path

from tests.support import views

urlpatterns: list[URLPattern] = [
    path("async/report/", views.async_report),
    path("async/fragment/<str:tag>/", views.async_fragment),
    path("whoami/", views.whoami),
    path("page/apee/", views.apee_page),
    path("page/plain/", views.plain_page),
    path("page/rich/", views.rich_page),
]
