"""Page routes of this app, mounted under /runs/ in the `runs` namespace."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path

from runs_app import views

run_patterns: list[URLPattern | URLResolver] = [
    path("", views.run_list, name="list"),
    path("new", views.run_new, name="new"),
    path("new/yaml", views.run_new_yaml, name="new_yaml"),
    path("datasets/", views.dataset_list, name="datasets"),
    path("datasets/<int:pk>/", views.dataset_detail, name="dataset"),
    path("<uuid:run_id>/", views.run_detail, name="detail"),
    path("<uuid:run_id>/status", views.run_status, name="status"),
    path("<uuid:run_id>/outputs", views.run_outputs, name="outputs"),
    path("<uuid:run_id>/metrics", views.run_metrics, name="metrics"),
    path("<uuid:run_id>/logs", views.run_logs, name="logs"),
    path("<uuid:run_id>/logs.txt", views.run_logs_download, name="logs_download"),
    path("<uuid:run_id>/trace", views.run_trace, name="trace"),
    path("<uuid:run_id>/snapshot", views.run_snapshot, name="snapshot"),
    path("<uuid:run_id>/snapshot.zip", views.run_snapshot_zip, name="snapshot_zip"),
    path("<uuid:run_id>/cancel", views.run_cancel_view, name="cancel"),
    path("<uuid:run_id>/resume", views.run_resume_view, name="resume"),
    path("<uuid:run_id>/rerun", views.run_rerun_view, name="rerun"),
    path("<uuid:run_id>/clone", views.run_clone_view, name="clone"),
    path("<uuid:run_id>/archive", views.run_archive_view, name="archive"),
    path("<uuid:run_id>/delete", views.run_delete_view, name="delete"),
]

urlpatterns: list[URLPattern | URLResolver] = [
    path("runs/", include((run_patterns, "runs"))),
]

# Comparison of runs (appended to the `runs` namespace: include() above holds this same list).
run_patterns += [
    path("compare", views.run_compare_view, name="compare"),
    path("compare/export.csv", views.run_compare_export_view, {"fmt": "csv"}, name="compare_csv"),
    path("compare/export.json", views.run_compare_export_view, {"fmt": "json"}, name="compare_json"),
    path("compare/changes", views.run_compare_changes_view, name="compare_changes"),
    path("archive-selected", views.run_archive_selected_view, name="archive_selected"),
]

# The deploy wizard and endpoint pages (the `endpoints` namespace). Scoring itself, /endpoints/<name>/score,
# is no Django route: runs_app/endpoints_asgi.py serves it.
endpoint_patterns: list[URLPattern | URLResolver] = [
    path("deploy/run/<uuid:run_id>/", views.deploy_run, name="deploy_run"),
    path("deploy/flow/<int:flow_id>/", views.deploy_flow, name="deploy_flow"),
    path("endpoints-admin/", views.endpoint_list, name="list"),
    path("endpoints-admin/<slug:name>/", views.endpoint_detail, name="detail"),
    path("endpoints-admin/<slug:name>/traffic", views.endpoint_traffic, name="traffic"),
    path("endpoints-admin/<slug:name>/toggle", views.endpoint_toggle, name="toggle"),
    path("endpoints-admin/<slug:name>/delete", views.endpoint_delete_view, name="delete"),
    path(
        "endpoints-admin/<slug:name>/deployments/<slug:deployment>/delete",
        views.deployment_delete_view,
        name="deployment_delete",
    ),
    path("endpoints-admin/<slug:name>/test", views.endpoint_test, name="test"),
    path("endpoints-admin/<slug:name>/consume", views.endpoint_consume, name="consume"),
    path(
        "endpoints-admin/<slug:name>/keys/<str:slot>/regenerate",
        views.endpoint_key_regenerate_view,
        name="regenerate",
    ),
    path("endpoints-admin/<slug:name>/monitoring", views.endpoint_monitoring_view, name="monitoring"),
]
urlpatterns += [path("", include((endpoint_patterns, "endpoints")))]
