"""Pages of the flows app: thin views over the selectors and services."""

from __future__ import annotations

import io
from typing import Any
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect, reswap, retarget, trigger_client_event

from flows_app import authoring
from flows_app.forms import (
    AddInputForm,
    AddNodeForm,
    AddOutputForm,
    ConnectionForm,
    FileSaveForm,
    FlowImportForm,
    FlowNewForm,
    PathForm,
    RenameForm,
    ShareForm,
    UploadForm,
    VersionImportForm,
)
from flows_app.selectors import (
    connection_get_for,
    connection_list_for,
    flow_get_for,
    flow_history_for,
    flow_list_for,
    flow_shares_for,
    flow_version_get_for,
    flows_with_shares,
)
from flows_app.services import (
    FlowConflict,
    FlowImportError,
    FlowPathError,
    connection_create,
    connection_delete,
    connection_test,
    connection_update,
    flow_clone,
    flow_create_from_template,
    flow_delete,
    flow_file_delete,
    flow_file_rename,
    flow_file_save,
    flow_files_upload,
    flow_import_zip,
    flow_restore,
    flow_restore_version,
    flow_share,
    flow_unshare,
    snapshot_file_read,
    snapshot_files,
    snapshot_zip,
)
from flows_app.workspace import folder_zip

LIST = "flows_app/connections/list.html"
DETAIL = "flows_app/connections/detail.html"
FORM = "flows_app/connections/form.html"
DELETE = "flows_app/connections/delete.html"


@login_required
@require_GET
def connection_list(request: HttpRequest) -> HttpResponse:
    """All connections the user can use; htmx gets just the rows for the name filter."""
    query = request.GET.get("q", "").strip()
    connections = connection_list_for(request.user)
    if query:
        connections = connections.filter(name__icontains=query)
    template = f"{LIST}#rows" if request.htmx else LIST
    return render(request, template, {"connections": connections, "q": query})


@login_required
@require_GET
def connection_detail(request: HttpRequest, pk: UUID) -> HttpResponse:
    """One connection, secrets masked; the owner also gets edit and delete."""
    connection = connection_get_for(request.user, pk=pk)
    return render(
        request, DETAIL, {"connection": connection, "can_edit": connection.owner_id == request.user.pk}
    )


def _save_form(request: HttpRequest, form: ConnectionForm) -> HttpResponse:
    if request.method == "POST" and form.is_valid():
        try:
            if form.connection is None:
                connection = connection_create(owner=request.user, **form.service_kwargs())
            else:
                connection = connection_update(
                    connection=form.connection, by=request.user, **form.service_kwargs()
                )
        except ValidationError as error:
            form.add_service_errors(error)
        else:
            messages.success(request, f"Connection '{connection.name}' saved.")
            url = reverse("connections:detail", kwargs={"pk": connection.pk})
            return HttpResponseClientRedirect(url) if request.htmx else redirect(url)
    template = f"{FORM}#form" if request.htmx else FORM
    # 422 on errors: base.html tells htmx to swap it in like a success.
    status = 422 if request.method == "POST" else 200
    return render(request, template, {"form": form, "connection": form.connection}, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def connection_new(request: HttpRequest) -> HttpResponse:
    """Create a connection."""
    return _save_form(request, ConnectionForm(request.POST or None, user=request.user))


@login_required
@require_http_methods(["GET", "POST"])
def connection_edit(request: HttpRequest, pk: UUID) -> HttpResponse:
    """Edit a connection (owner only); a blank secret keeps the stored value."""
    connection = connection_get_for(request.user, pk=pk, editable=True)
    return _save_form(request, ConnectionForm(request.POST or None, user=request.user, connection=connection))


@login_required
@require_http_methods(["GET", "POST"])
def connection_delete_view(request: HttpRequest, pk: UUID) -> HttpResponse:
    """Confirm (GET) and delete (POST) a connection (owner only)."""
    connection = connection_get_for(request.user, pk=pk, editable=True)
    if request.method == "GET":
        return render(request, DELETE, {"connection": connection})
    connection_delete(connection=connection, by=request.user)
    messages.success(request, f"Connection '{connection.name}' deleted.")
    url = reverse("connections:list")
    return HttpResponseClientRedirect(url) if request.htmx else redirect(url)


@login_required
@require_POST
def connection_test_view(request: HttpRequest, pk: UUID) -> HttpResponse:
    """Make one real call with the connection; htmx swaps in the outcome, others get the detail page."""
    connection = connection_get_for(request.user, pk=pk)
    result = connection_test(connection=connection)
    context = {"connection": connection, "can_edit": connection.owner_id == request.user.pk, "result": result}
    return render(request, f"{DETAIL}#test-result" if request.htmx else DETAIL, context)


# --- flows: list, create, import, trash --------------------------------------------------------------

FLOW_LIST = "flows_app/list.html"
FLOW_NEW = "flows_app/new.html"
WORKSPACE = "flows_app/workspace.html"
CONFLICT = "flows_app/conflict.html"
HISTORY = "flows_app/history.html"
DIFF = "flows_app/diff.html"
SHARE = "flows_app/share.html"
# Errors a file operation reports to the user, naming the file and the reason.
EDIT_ERRORS = (ValidationError, FlowPathError, FlowImportError)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def _error_text(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return " ".join(error.messages)
    return str(error)


def _flow_url(flow_id: int, **query: Any) -> str:
    url = reverse("flows:detail", kwargs={"pk": flow_id})
    pairs = "&".join(f"{k}={v}" for k, v in query.items() if v not in (None, ""))
    return f"{url}?{pairs}" if pairs else url


def _go(request: HttpRequest, url: str) -> HttpResponse:
    return HttpResponseClientRedirect(url) if request.htmx else redirect(url)


@login_required
@require_GET
def flow_list(request: HttpRequest) -> HttpResponse:
    """My flows, flows shared with me, or a team's; the search and the scope live in the URL."""
    from accounts_app.selectors import teams_for

    query, scope = request.GET.get("q", "").strip(), request.GET.get("scope", "all")
    team_id = _int(request.GET.get("team"))
    flows = flows_with_shares(flow_list_for(request.user, query=query, team_id=team_id))
    if scope == "mine":
        flows = flows.filter(owner=request.user)
    elif scope == "shared":
        flows = flows.exclude(owner=request.user)
    context = {
        "flows": flows,
        "q": query,
        "scope": scope,
        "team_id": team_id,
        "teams": teams_for(request.user),
    }
    return render(request, f"{FLOW_LIST}#rows" if request.htmx else FLOW_LIST, context)


@login_required
@require_http_methods(["GET", "POST"])
def flow_new(request: HttpRequest) -> HttpResponse:
    """Create a flow from a template (the import form on the same page posts to flow_import)."""
    form = FlowNewForm(request.POST or None, user=request.user)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            flow = flow_create_from_template(
                owner=request.user, name=data["name"], template=data["template"], team=data["team"]
            )
        except ValidationError as error:
            form.add_error(None, error)
        else:
            return _go(request, _flow_url(flow.pk))
    context = {"form": form, "import_form": FlowImportForm(user=request.user)}
    return render(request, FLOW_NEW, context, status=422 if form.errors else 200)


@login_required
@require_POST
def flow_import(request: HttpRequest) -> HttpResponse:
    """Import a zip as a new flow; a refused archive is reported with its reason and nothing is written."""
    form = FlowImportForm(request.POST, request.FILES, user=request.user)
    if form.is_valid():
        try:
            version = flow_import_zip(
                owner=request.user,
                data=form.cleaned_data["archive"].read(),
                name=form.flow_name(),
                team=form.cleaned_data["team"],
            )
        except EDIT_ERRORS as error:
            form.add_error("archive", _error_text(error))
        else:
            return _go(request, _flow_url(version.flow_id))
    context = {"form": FlowNewForm(user=request.user), "import_form": form}
    return render(request, FLOW_NEW, context, status=422)


@login_required
@require_GET
def flow_trash(request: HttpRequest) -> HttpResponse:
    """The user's deleted flows, with restore."""
    return render(request, "flows_app/trash.html", {"flows": flow_list_for(request.user, trash=True)})


@login_required
@require_POST
def flow_delete_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Move a flow to the trash (owner only)."""
    flow = flow_delete(flow=flow_get_for(request.user, pk), user=request.user)
    messages.success(request, f"Flow '{flow.name}' moved to the trash.")
    return _go(request, reverse("flows:list"))


@login_required
@require_POST
def flow_restore_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Bring a flow back from the trash."""
    flow = flow_restore(flow=flow_get_for(request.user, pk, include_trash=True), user=request.user)
    messages.success(request, f"Flow '{flow.name}' restored.")
    return _go(request, _flow_url(flow.pk))


@login_required
@require_POST
def flow_clone_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Copy a flow (its head, or `version`) into a new flow of the user's."""
    source = flow_get_for(request.user, pk)
    clone = flow_clone(flow=source, user=request.user, number=_int(request.POST.get("version")))
    messages.success(request, f"Cloned '{source.name}' as '{clone.name}'.")
    return _go(request, _flow_url(clone.pk))


# --- flows: the authoring workspace -----------------------------------------------------------------


@login_required
@require_GET
def flow_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """The authoring page: file tree, editor (raw or structured) and the graph, inputs/outputs and problems."""
    context = authoring.page_context(
        request.user,
        pk,
        number=_int(request.GET.get("version")),
        path=request.GET.get("file"),
        mode=request.GET.get("mode"),
        line=_int(request.GET.get("line")),
    )
    return render(request, WORKSPACE, context)


@login_required
@require_GET
def flow_file(request: HttpRequest, pk: int) -> HttpResponse:
    """The editor pane for one file (htmx), or the whole page opened on that file."""
    if not request.htmx:
        return flow_detail(request, pk)
    flow = flow_get_for(request.user, pk)
    version = flow_version_get_for(request.user, pk, _int(request.GET.get("version")))
    editor = authoring.editor_context(
        version, request.GET.get("file"), mode=request.GET.get("mode"), line=_int(request.GET.get("line"))
    )
    context = {"flow": flow, "version": version, "editor": editor, **authoring.role_context(flow, version)}
    return render(request, f"{WORKSPACE}#editor", context)


@login_required
@require_GET
def flow_file_download(request: HttpRequest, pk: int) -> HttpResponse:
    """One file of a version, as an attachment."""
    version = flow_version_get_for(request.user, pk, _int(request.GET.get("version")))
    path = request.GET.get("path", "")
    try:
        data = snapshot_file_read(snapshot=version.snapshot, path=path)
    except FlowPathError as error:
        raise Http404(str(error)) from None
    name = path.rsplit("/", 1)[-1]
    return FileResponse(
        io.BytesIO(data), as_attachment=True, filename=name, content_type="application/octet-stream"
    )


@login_required
@require_GET
def flow_download(request: HttpRequest, pk: int) -> HttpResponse:
    """A version of the flow as a zip (the head unless `version`); the same version always gives the same bytes."""
    version = flow_version_get_for(request.user, pk, _int(request.GET.get("version")))
    folder = request.GET.get("folder", "").strip("/")
    if folder:
        data = folder_zip(snapshot_files(snapshot=version.snapshot), folder)
        filename = f"{folder.rsplit('/', 1)[-1]}.zip"
    else:
        data = snapshot_zip(snapshot=version.snapshot)
        filename = f"{version.flow.name}-v{version.number}.zip".replace("/", "_")
    return FileResponse(
        io.BytesIO(data), as_attachment=True, filename=filename, content_type="application/zip"
    )


@login_required
@require_GET
def flow_graph_json(request: HttpRequest, pk: int) -> JsonResponse:
    """The graph of a version as JSON: {kind, nodes, edges}."""
    version = flow_version_get_for(request.user, pk, _int(request.GET.get("version")))
    return JsonResponse(authoring.side_context(version)["graph"])


def _changed(request: HttpRequest, pk: int, note: str, **extra: Any) -> HttpResponse:
    """After a write: the tree, side pane and version badge as out-of-band swaps, plus a `flow-changed` event."""
    if not request.htmx:
        messages.success(request, note)
        return redirect(_flow_url(pk, file=extra.get("path")))
    context = authoring.page_context(
        request.user, pk, number=None, path=extra.get("path"), mode=extra.get("mode")
    )
    response = render(
        request, f"{WORKSPACE}#changed", {**context, "note": note, "with_editor": "mode" in extra}
    )
    detail = {"version": context["version"].number, "note": note, **extra}
    return trigger_client_event(response, "flow-changed", detail)


def _refused(request: HttpRequest, pk: int, error: Exception | str) -> HttpResponse:
    """A refused write: the reason in the status bar (422), or a message on the page without htmx."""
    text = error if isinstance(error, str) else _error_text(error)
    if isinstance(error, FlowConflict):
        text = f"{text} Reload the page to see the other change."
    if not request.htmx:
        messages.error(request, text)
        return redirect(_flow_url(pk))
    response = render(request, f"{WORKSPACE}#status", {"error": text}, status=422)
    return retarget(reswap(response, "innerHTML"), "#ws-status")


@login_required
@require_POST
def flow_save_file(request: HttpRequest, pk: int) -> HttpResponse:
    """Save one file based on the version the editor loaded; a stale save answers 409 with the conflict view."""
    # The write views authorise before validating, so an outsider's bad form gets 404, not the form's refusal.
    flow = flow_get_for(request.user, pk, edit=True)
    form = FileSaveForm(request.POST)
    if not form.is_valid():
        return _refused(request, pk, " ".join(m for ms in form.errors.values() for m in ms))
    data = form.cleaned_data
    try:
        version = flow_file_save(
            flow=flow,
            user=request.user,
            path=data["path"],
            content=data["content"].encode(),
            based_on=data["based_on"],
            message=data["message"],
        )
    except FlowConflict as conflict:
        context = authoring.conflict_context(
            request.user,
            pk,
            path=data["path"],
            mine=data["content"],
            based_on=data["based_on"],
            head=conflict.head,
        )
        return retarget(reswap(render(request, CONFLICT, context, status=409), "innerHTML"), "#ws-editor")
    except EDIT_ERRORS as error:
        return _refused(request, pk, error)
    return _changed(
        request,
        pk,
        f"Saved {data['path']} as v{version.number}.",
        path=data["path"],
        saved=True,
        merged=data["merged"],
    )


@login_required
@require_POST
def flow_file_add(request: HttpRequest, pk: int) -> HttpResponse:
    """Add an empty file, or a folder when the path ends with '/'."""
    flow_get_for(request.user, pk, edit=True)
    path = (request.htmx.prompt or request.POST.get("path", "")).strip()
    if path and request.POST.get("kind") == "folder":
        path = path.rstrip("/") + "/"
    form = PathForm({**request.POST.dict(), "path": path})
    if not form.is_valid():
        return _refused(request, pk, "Give a path for the new file, for example prompts/answer.jinja2.")
    try:
        version = authoring.file_add(request.user, pk, **form.cleaned_data)
    except (*EDIT_ERRORS, FlowConflict) as error:
        return _refused(request, pk, error)
    path = next(
        (p for p in sorted(version.snapshot.manifest) if p.startswith(form.cleaned_data["path"])), None
    )
    return _changed(request, pk, f"Added {form.cleaned_data['path']}.", path=path, opened=True)


@login_required
@require_POST
def flow_file_rename_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Rename or move a file or folder; the new path comes from the prompt."""
    flow = flow_get_for(request.user, pk, edit=True)
    form = RenameForm(
        {**request.POST.dict(), "new_path": request.htmx.prompt or request.POST.get("new_path", "")}
    )
    if not form.is_valid():
        return _refused(request, pk, "Give the new path.")
    data = form.cleaned_data
    try:
        flow_file_rename(flow=flow, user=request.user, **data)
    except (*EDIT_ERRORS, FlowConflict) as error:
        return _refused(request, pk, error)
    return _changed(
        request,
        pk,
        f"Renamed {data['path']} to {data['new_path']}.",
        renamed=data["path"],
        path=data["new_path"],
    )


@login_required
@require_POST
def flow_file_delete_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Delete a file or a folder with everything in it."""
    flow = flow_get_for(request.user, pk, edit=True)
    form = PathForm(request.POST)
    if not form.is_valid():
        return _refused(request, pk, "Say which file to delete.")
    try:
        flow_file_delete(flow=flow, user=request.user, **form.cleaned_data)
    except (*EDIT_ERRORS, FlowConflict) as error:
        return _refused(request, pk, error)
    return _changed(request, pk, f"Deleted {form.cleaned_data['path']}.", deleted=form.cleaned_data["path"])


@login_required
@require_POST
def flow_upload(request: HttpRequest, pk: int) -> HttpResponse:
    """Upload files, or a folder (each file's relative path comes in `paths`), into a folder of the flow."""
    flow = flow_get_for(request.user, pk, edit=True)
    form = UploadForm(request.POST, request.FILES)
    if not form.is_valid():
        return _refused(request, pk, "Choose at least one file to upload.")
    files = form.named_files()
    try:
        flow_files_upload(
            flow=flow,
            user=request.user,
            files=files,
            based_on=form.cleaned_data["based_on"],
            folder=form.cleaned_data["folder"],
        )
    except (*EDIT_ERRORS, FlowConflict) as error:
        return _refused(request, pk, error)
    return _changed(request, pk, f"Uploaded {len(files)} file{'s' if len(files) != 1 else ''}.")


@login_required
@require_POST
def flow_import_version(request: HttpRequest, pk: int) -> HttpResponse:
    """Import a zip as a new version of this flow."""
    flow = flow_get_for(request.user, pk, edit=True)
    form = VersionImportForm(request.POST, request.FILES)
    if not form.is_valid():
        return _refused(request, pk, "Choose a zip file to import.")
    try:
        version = flow_import_zip(
            owner=request.user,
            data=form.cleaned_data["archive"].read(),
            into=flow,
            based_on=form.cleaned_data["based_on"],
            message=form.cleaned_data["message"],
        )
    except (*EDIT_ERRORS, FlowConflict) as error:
        return _refused(request, pk, error)
    messages.success(request, f"Imported the archive as v{version.number}.")
    return _go(request, _flow_url(pk))


STRUCTURE_FORMS = {"input": AddInputForm, "output": AddOutputForm, "node": AddNodeForm}


@login_required
@require_POST
def flow_structure_add(request: HttpRequest, pk: int, what: str) -> HttpResponse:
    """The structured view's forms: add an input, an output or a node to flow.dag.yaml."""
    form_class = STRUCTURE_FORMS.get(what)
    if form_class is None:
        raise Http404("No such structure edit.")
    flow_get_for(request.user, pk, edit=True)
    form = form_class(request.POST)
    if not form.is_valid():
        return _refused(request, pk, "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
    fields = dict(form.cleaned_data)
    based_on = fields.pop("based_on")
    try:
        authoring.structure_edit(request.user, pk, based_on=based_on, what=what, fields=fields)
    except (*EDIT_ERRORS, FlowConflict) as error:
        return _refused(request, pk, error)
    return _changed(request, pk, f"Added {what} '{fields['name']}'.", path="flow.dag.yaml", mode="structured")


# --- flows: history, diff, sharing --------------------------------------------------------------------


@login_required
@require_GET
def flow_history(request: HttpRequest, pk: int) -> HttpResponse:
    """A page of versions, newest first, to compare or restore; the page is in the URL, htmx gets the table."""
    flow, page = flow_history_for(request.user, pk, page=request.GET.get("page"))
    context = {
        "flow": flow,
        "page": page,
        "versions": list(page.object_list),
        "can_edit": flow.role in ("owner", "editor"),
    }
    return render(request, f"{HISTORY}#versions" if request.htmx else HISTORY, context)


@login_required
@require_GET
def flow_diff(request: HttpRequest, pk: int) -> HttpResponse:
    """File-level unified diffs and the DAG diff between versions `a` and `b`; `full=1` expands large diffs."""
    context = authoring.diff_context(
        request.user,
        pk,
        a=_int(request.GET.get("a")),
        b=_int(request.GET.get("b")),
        full=request.GET.get("full") == "1",
    )
    return render(request, DIFF, context)


@login_required
@require_POST
def flow_restore_version_view(request: HttpRequest, pk: int, number: int) -> HttpResponse:
    """Make a new version with the files of version `number`."""
    flow = flow_get_for(request.user, pk, edit=True)
    version = flow_restore_version(flow=flow, user=request.user, number=number)
    messages.success(request, f"Restored v{number} as v{version.number}.")
    return _go(request, _flow_url(pk))


@login_required
@require_http_methods(["GET", "POST"])
def flow_share_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Who the flow is shared with; the owner adds users or teams as viewer or editor."""
    flow = flow_get_for(request.user, pk)
    form = ShareForm(request.POST or None, user=request.user)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            flow_share(flow=flow, by=request.user, user=data["user"], team=data["team"], role=data["role"])
        except ValidationError as error:
            form.add_error(None, error)
        else:
            form = ShareForm(user=request.user)
    context = {"flow": flow, "form": form, "shares": flow_shares_for(request.user, pk)}
    return render(
        request, f"{SHARE}#body" if request.htmx else SHARE, context, status=422 if form.errors else 200
    )


@login_required
@require_POST
def flow_unshare_view(request: HttpRequest, pk: int, share_id: int) -> HttpResponse:
    """Stop sharing with one user or team."""
    flow = flow_get_for(request.user, pk)
    share = flow_shares_for(request.user, pk).filter(pk=share_id).first()
    if share is None:
        raise Http404("No such share.")
    flow_unshare(flow=flow, by=request.user, user=share.user, team=share.team)
    context = {
        "flow": flow,
        "form": ShareForm(user=request.user),
        "shares": flow_shares_for(request.user, pk),
    }
    return render(request, f"{SHARE}#body" if request.htmx else SHARE, context)
