"""Page routes of this app."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path

from flows_app import views

connection_patterns: list[URLPattern | URLResolver] = [
    path("", views.connection_list, name="list"),
    path("new", views.connection_new, name="new"),
    path("<uuid:pk>/", views.connection_detail, name="detail"),
    path("<uuid:pk>/edit", views.connection_edit, name="edit"),
    path("<uuid:pk>/delete", views.connection_delete_view, name="delete"),
    path("<uuid:pk>/test", views.connection_test_view, name="test"),
]

flow_patterns: list[URLPattern | URLResolver] = [
    path("", views.flow_list, name="list"),
    path("new", views.flow_new, name="new"),
    path("import", views.flow_import, name="import"),
    path("trash", views.flow_trash, name="trash"),
    path("<int:pk>/", views.flow_detail, name="detail"),
    path("<int:pk>/file", views.flow_file, name="file"),
    path("<int:pk>/file/download", views.flow_file_download, name="file_download"),
    path("<int:pk>/file/save", views.flow_save_file, name="save"),
    path("<int:pk>/file/add", views.flow_file_add, name="file_add"),
    path("<int:pk>/file/rename", views.flow_file_rename_view, name="file_rename"),
    path("<int:pk>/file/delete", views.flow_file_delete_view, name="file_delete"),
    path("<int:pk>/upload", views.flow_upload, name="upload"),
    path("<int:pk>/download", views.flow_download, name="download"),
    path("<int:pk>/import", views.flow_import_version, name="import_version"),
    path("<int:pk>/graph.json", views.flow_graph_json, name="graph"),
    path("<int:pk>/structure/<str:what>", views.flow_structure_add, name="structure_add"),
    path("<int:pk>/history", views.flow_history, name="history"),
    path("<int:pk>/diff", views.flow_diff, name="diff"),
    path("<int:pk>/versions/<int:number>/restore", views.flow_restore_version_view, name="restore_version"),
    path("<int:pk>/share", views.flow_share_view, name="share"),
    path("<int:pk>/share/<int:share_id>/remove", views.flow_unshare_view, name="unshare"),
    path("<int:pk>/clone", views.flow_clone_view, name="clone"),
    path("<int:pk>/delete", views.flow_delete_view, name="delete"),
    path("<int:pk>/restore", views.flow_restore_view, name="restore"),
]

urlpatterns: list[URLPattern | URLResolver] = [
    path("connections/", include((connection_patterns, "connections"))),
    path("flows/", include((flow_patterns, "flows"))),
]
