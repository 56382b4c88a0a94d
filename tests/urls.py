"""URLs of the test suite's live-server tests."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
