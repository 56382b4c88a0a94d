from django.urls import path

from shop import views

urlpatterns = [
    path("", views.home, name="home"),
    path("report/", views.report_page, name="report"),
    path("report.json", views.report_json, name="report-json"),
    path("report-async.json", views.report_async, name="report-async"),
    path("category/<int:category_id>/", views.category_page, name="category"),
    path("about/", views.about, name="about"),
]
