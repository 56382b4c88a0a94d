from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("django_prometheus.urls")),  # /metrics
    path("", include("shop.urls")),
    # The admin's CSS under gunicorn too (only while DEBUG, as Django allows).
    *staticfiles_urlpatterns(),
]
