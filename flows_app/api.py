"""REST routes of this app under /api/v1/: connections and flows (TokenAuth is applied to the whole API in studio/api.py)."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.utils.http import content_disposition_header
from ninja import File, Form, Router, Schema, UploadedFile
from ninja.responses import Status
from pydantic import Field

from flows_app.models import CONNECTION_NAME_RULE, Blob, Connection, Flow, FlowShare, FlowVersion
from flows_app.selectors import (
    connection_get_for,
    connection_list_for,
    flow_get_for,
    flow_list_for,
    flow_role_for,
    flow_shares_for,
    flow_version_get_for,
    flow_versions_for,
    snapshot_get_for,
)
from flows_app.services import (
    KEEP,
    SECRET_MASK,
    FlowConflict,
    FlowImportError,
    FlowPathError,
    connection_create,
    connection_delete,
    connection_test,
    connection_update,
    flow_create,
    flow_create_from_template,
    flow_delete,
    flow_file_delete,
    flow_file_save,
    flow_import_zip,
    flow_share,
    flow_unshare,
    snapshot_file_read,
    snapshot_zip,
    zip_limits,
)

router = Router(tags=["connections"])

ConnectionType = Literal["open_ai", "azure_open_ai", "openai_compatible", "custom"]
ConfigValue = str | int | float | bool | None


class ConnectionOut(Schema):
    """A connection as the API shows it: every secret value is '******'."""

    id: UUID
    name: str
    type: ConnectionType
    configs: dict[str, ConfigValue]
    secrets: dict[str, str] = Field(description="Secret names, each with the value '******'.")
    owner: str
    team: str | None = Field(description="The team it is shared with (read-only for its members).")
    editable: bool = Field(description="Whether the caller owns it and may change it.")
    created_at: datetime
    updated_at: datetime


class ConnectionIn(Schema):
    """A new connection; secrets are encrypted at rest and never returned."""

    name: str = Field(description=f"Flows refer to it by this name: {CONNECTION_NAME_RULE}.")
    type: ConnectionType
    configs: dict[str, ConfigValue] = Field(
        default_factory=dict,
        description="base_url, api_base, api_version, organization, model, or any custom key.",
    )
    secrets: dict[str, str] = Field(default_factory=dict, description="api_key and any custom secrets.")
    team: str | None = Field(default=None, description="Name of one of your teams to share it with.")


class ConnectionPatch(Schema):
    """A partial update: configs, when given, replace the stored ones; secrets merge."""

    name: str | None = None
    type: ConnectionType | None = None
    configs: dict[str, ConfigValue] | None = None
    secrets: dict[str, str | None] | None = Field(
        default=None,
        description="'******' or '' keeps a stored value, null removes it, anything else sets it.",
    )
    team: str | None = Field(default=None, description="A team name to share with; null or '' stops sharing.")


class TestOut(Schema):
    """The outcome of one real call with the connection."""

    ok: bool
    message: str


class ErrorOut(Schema):
    """An error with the messages of each field at fault."""

    detail: str
    errors: dict[str, list[str]] = Field(default_factory=dict)


def _user(request: HttpRequest) -> AbstractBaseUser:
    auth = getattr(request, "auth", None)
    return auth if isinstance(auth, AbstractBaseUser) else request.user  # type: ignore[return-value]


def _out(connection: Connection, user: AbstractBaseUser) -> dict[str, Any]:
    return {
        "id": connection.id,
        "name": connection.name,
        "type": connection.type,
        "configs": connection.configs,
        "secrets": {name: SECRET_MASK for name in connection.secret_names},
        "owner": connection.owner.get_username(),
        "team": connection.team.name if connection.team_id else None,
        "editable": connection.owner_id == user.pk,
        "created_at": connection.created_at,
        "updated_at": connection.updated_at,
    }


def _error(error: ValidationError) -> ErrorOut:
    errors = error.message_dict if hasattr(error, "error_dict") else {"__all__": error.messages}
    detail = "; ".join(f"{field}: {message}" for field, messages in errors.items() for message in messages)
    return ErrorOut(detail=detail, errors=errors)


def _team(user: AbstractBaseUser, name: str | None) -> Any:
    from accounts_app.models import Team
    from accounts_app.selectors import user_team_ids

    if not name:
        return None
    team = Team.objects.filter(name=name, pk__in=list(user_team_ids(user))).first()
    if team is None:
        raise ValidationError({"team": f"You are not a member of a team named '{name}'."})
    return team


def _editable(request: HttpRequest, name: str) -> Connection:
    try:
        return connection_get_for(_user(request), name=name, editable=True)
    except PermissionDenied as denied:
        from ninja.errors import HttpError

        raise HttpError(403, str(denied)) from None


@router.get("/connections", response=list[ConnectionOut], summary="List your connections and shared ones")
def connections_list(request: HttpRequest) -> list[dict[str, Any]]:
    """Your connections plus those shared with your teams; secrets masked."""
    user = _user(request)
    return [_out(connection, user) for connection in connection_list_for(user)]


@router.post("/connections", response={201: ConnectionOut, 422: ErrorOut}, summary="Create a connection")
def connections_create(request: HttpRequest, payload: ConnectionIn) -> Status:
    """Create a connection owned by the caller."""
    user = _user(request)
    try:
        connection = connection_create(
            owner=user,
            name=payload.name,
            type=payload.type,
            configs=payload.configs,
            secrets=payload.secrets,
            team=_team(user, payload.team),
        )
    except ValidationError as error:
        return Status(422, _error(error))
    return Status(201, _out(connection, user))


@router.get("/connections/{name}", response=ConnectionOut, summary="Show a connection")
def connections_get(request: HttpRequest, name: str) -> dict[str, Any]:
    """One connection by name (yours first, then shared ones); secrets masked."""
    user = _user(request)
    return _out(connection_get_for(user, name=name), user)


@router.patch(
    "/connections/{name}",
    response={200: ConnectionOut, 403: ErrorOut, 422: ErrorOut},
    summary="Update a connection",
)
def connections_update(request: HttpRequest, name: str, payload: ConnectionPatch) -> Status:
    """Change a connection you own; secrets you leave out or send as '******' stay as they are."""
    user = _user(request)
    connection = _editable(request, name)
    try:
        team = _team(user, payload.team) if "team" in payload.model_fields_set else KEEP
        connection = connection_update(
            connection=connection,
            by=user,
            name=payload.name,
            type=payload.type,
            configs=payload.configs,
            secrets=payload.secrets,
            team=team,
        )
    except ValidationError as error:
        return Status(422, _error(error))
    return Status(200, _out(connection, user))


@router.delete("/connections/{name}", response={204: None, 403: ErrorOut}, summary="Delete a connection")
def connections_delete(request: HttpRequest, name: str) -> Status:
    """Delete a connection you own."""
    connection_delete(connection=_editable(request, name), by=_user(request))
    return Status(204, None)


@router.post("/connections/{name}/test", response=TestOut, summary="Test a connection with one real call")
def connections_test(request: HttpRequest, name: str) -> TestOut:
    """List models (or a 1-token chat when a default model is set); the message never contains a secret."""
    result = connection_test(connection=connection_get_for(_user(request), name=name))
    return TestOut(ok=result.ok, message=result.message)


# --- flows ------------------------------------------------------------------------------------------

flows_router = Router(tags=["flows"])
router.add_router("", flows_router)

FlowKind = Literal["dag", "flex", "prompty", ""]
FlowRole = Literal["owner", "editor", "viewer"]
TemplateName = Literal["standard", "chat", "evaluation", "flex", "prompty"]
ZIP_RESPONSE = {
    "responses": {
        200: {
            "description": "A zip of the flow folder (deterministic: the same files give the same bytes).",
            "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
        }
    }
}


class VersionOut(Schema):
    """One saved version of a flow."""

    number: int
    author: str | None
    created_at: datetime
    message: str
    based_on: int | None = Field(description="The version this one was saved on top of.")
    snapshot: str = Field(description="sha256 of the snapshot (the manifest of its files).")
    file_count: int
    total_size: int


class FlowOut(Schema):
    """A flow as the API shows it, with the caller's role on it."""

    id: int
    name: str
    description: str
    kind: FlowKind
    owner: str
    team: str | None
    role: FlowRole
    head: int | None = Field(description="The newest version number: send it as `based_on` when saving.")
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = Field(description="Set while the flow is in the trash.")


class FlowCreateIn(Schema):
    """A new flow: from a template, from text files, or empty."""

    name: str
    template: TemplateName | None = Field(default=None, description="Start from a `flow init` template.")
    files: dict[str, str] = Field(default_factory=dict, description="UTF-8 text files by relative path.")
    description: str = ""
    team: str | None = Field(default=None, description="Name of one of your teams to file it under.")


class FileOut(Schema):
    """A file of one version."""

    path: str
    size: int
    sha256: str


class FileSaveIn(Schema):
    """New content for one file, saved as a new version on top of `based_on`."""

    based_on: int = Field(description="The version you edited; a stale one gets 409 with the head.")
    content: str
    encoding: Literal["utf-8", "base64"] = "utf-8"
    message: str = ""


class ConflictOut(Schema):
    """Someone saved since the version you edited: nothing was written."""

    detail: str
    head: VersionOut


class RefusedOut(Schema):
    """A path or an archive refused before anything was written, with a stable reason code."""

    detail: str
    reason: str
    entry: str | None = None


class ShareIn(Schema):
    """Share with one user (by username) or one team (by name)."""

    user: str | None = None
    team: str | None = None
    role: Literal["viewer", "editor"] = "viewer"


class ShareOut(Schema):
    """One share of a flow."""

    user: str | None
    team: str | None
    role: Literal["viewer", "editor"]


class ImportedOut(Schema):
    """The flow an archive was imported into and the version it made."""

    flow: FlowOut
    version: VersionOut


def _version_out(version: FlowVersion) -> dict[str, Any]:
    return {
        "number": version.number,
        "author": version.author.get_username() if version.author_id else None,
        "created_at": version.created_at,
        "message": version.message,
        "based_on": version.based_on.number if version.based_on_id else None,
        "snapshot": version.snapshot.sha256,
        "file_count": version.snapshot.file_count,
        "total_size": version.snapshot.total_size,
    }


def _flow_out(flow: Flow, user: AbstractBaseUser) -> dict[str, Any]:
    role = getattr(flow, "role", None) or flow_role_for(user, flow)
    return {
        "id": flow.pk,
        "name": flow.name,
        "description": flow.description,
        "kind": flow.kind,
        "owner": flow.owner.get_username(),
        "team": flow.team.name if flow.team_id else None,
        "role": role,
        "head": flow.head.number if flow.head_id else None,
        "created_at": flow.created_at,
        "updated_at": flow.updated_at,
        "deleted_at": flow.deleted_at,
    }


def _editable_flow(request: HttpRequest, flow_id: int) -> Flow:
    try:
        return flow_get_for(_user(request), flow_id, edit=True)
    except PermissionDenied as denied:
        from ninja.errors import HttpError

        raise HttpError(403, str(denied)) from None


def _refused(error: FlowPathError | FlowImportError) -> RefusedOut:
    entry = error.entry if isinstance(error, FlowImportError) else error.path
    return RefusedOut(detail=str(error), reason=error.reason, entry=entry)


def _conflict(error: FlowConflict) -> ConflictOut:
    assert error.head is not None
    return ConflictOut(detail=str(error), head=VersionOut(**_version_out(error.head)))


def _zip_response(data: bytes, filename: str) -> HttpResponse:
    response = HttpResponse(data, content_type="application/zip")
    response["Content-Disposition"] = content_disposition_header(as_attachment=True, filename=filename)
    return response


def _upload_bytes(upload: UploadedFile) -> bytes:
    from ninja.errors import HttpError

    max_bytes, _, _ = zip_limits()
    if upload.size is not None and upload.size > max_bytes:
        raise HttpError(413, f"The upload is {upload.size:,} bytes; the limit is {max_bytes:,}.")
    return upload.read()


@flows_router.get("/flows", response=list[FlowOut], summary="List flows you own or that are shared with you")
def flows_list(request: HttpRequest, q: str = "", trash: bool = False) -> list[dict[str, Any]]:
    """Your flows and those shared with you (newest change first); `trash=true` lists your trash."""
    user = _user(request)
    return [_flow_out(flow, user) for flow in flow_list_for(user, trash=trash, query=q)]


@flows_router.post("/flows", response={201: FlowOut, 400: RefusedOut, 422: ErrorOut}, summary="Create a flow")
def flows_create(request: HttpRequest, payload: FlowCreateIn) -> Status:
    """Create a flow from a template, from text files, or empty."""
    user = _user(request)
    try:
        team = _team(user, payload.team)
        if payload.template:
            flow = flow_create_from_template(
                owner=user, name=payload.name, template=payload.template, team=team
            )
        else:
            files = {path: text.encode() for path, text in payload.files.items()}
            flow = flow_create(
                owner=user, name=payload.name, files=files, team=team, description=payload.description
            )
    except FlowPathError as error:
        return Status(400, _refused(error))
    except ValidationError as error:
        return Status(422, _error(error))
    return Status(201, _flow_out(flow_get_for(user, flow.pk), user))


@flows_router.post(
    "/flows/import",
    response={201: ImportedOut, 400: RefusedOut, 413: ErrorOut, 422: ErrorOut},
    summary="Import a zip as a new flow",
)
def flows_import_new(request: HttpRequest, file: File[UploadedFile], name: Form[str | None] = None) -> Status:
    """A zip of a flow folder (a prompt flow folder imports as is); hostile archives get 400 with the reason."""
    user = _user(request)
    try:
        version = flow_import_zip(owner=user, data=_upload_bytes(file), name=name or None)
    except FlowImportError as error:
        return Status(400, _refused(error))
    except ValidationError as error:
        return Status(422, _error(error))
    flow = flow_get_for(user, version.flow_id)
    return Status(201, {"flow": _flow_out(flow, user), "version": _version_out(version)})


@flows_router.get("/flows/{flow_id}", response=FlowOut, summary="Show a flow")
def flows_get(request: HttpRequest, flow_id: int) -> dict[str, Any]:
    """One flow you can see."""
    user = _user(request)
    return _flow_out(flow_get_for(user, flow_id), user)


@flows_router.delete(
    "/flows/{flow_id}", response={204: None, 403: ErrorOut}, summary="Move a flow to the trash"
)
def flows_delete(request: HttpRequest, flow_id: int) -> Status:
    """Move a flow you own to your trash (restorable from the studio)."""
    user = _user(request)
    try:
        flow_delete(flow=flow_get_for(user, flow_id), user=user)
    except PermissionDenied as denied:
        return Status(403, ErrorOut(detail=str(denied)))
    return Status(204, None)


@flows_router.get("/flows/{flow_id}/versions", response=list[VersionOut], summary="A flow's history")
def flows_versions(request: HttpRequest, flow_id: int) -> list[dict[str, Any]]:
    """Every version, newest first."""
    return [_version_out(version) for version in flow_versions_for(_user(request), flow_id)]


@flows_router.get(
    "/flows/{flow_id}/versions/{number}/files", response=list[FileOut], summary="The files of a version"
)
def flows_version_files(request: HttpRequest, flow_id: int, number: int) -> list[dict[str, Any]]:
    """Paths, sizes and content hashes of one version's files."""
    snapshot = flow_version_get_for(_user(request), flow_id, number).snapshot
    sizes = dict(
        Blob.objects.filter(sha256__in=set(snapshot.manifest.values())).values_list("sha256", "size")
    )
    return [{"path": path, "size": sizes[sha], "sha256": sha} for path, sha in snapshot.manifest.items()]


@flows_router.get(
    "/flows/{flow_id}/files/{path:path}",
    response={400: RefusedOut, 404: ErrorOut},
    summary="Read one file",
    openapi_extra={
        "responses": {
            200: {
                "description": "The file's bytes; the X-Flow-Version header names the version read.",
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        }
    },
)
def flows_file_read(request: HttpRequest, flow_id: int, path: str, version: int | None = None) -> Any:
    """The content of one file of the head (or of `version`)."""
    flow_version = flow_version_get_for(_user(request), flow_id, version)
    try:
        data = snapshot_file_read(snapshot=flow_version.snapshot, path=path)
    except FlowPathError as error:
        if error.reason == "not_found":
            return Status(404, ErrorOut(detail=str(error)))
        return Status(400, _refused(error))
    response = HttpResponse(data, content_type="application/octet-stream")
    response["X-Flow-Version"] = str(flow_version.number)
    return response


@flows_router.put(
    "/flows/{flow_id}/files/{path:path}",
    response={201: VersionOut, 400: RefusedOut, 403: ErrorOut, 409: ConflictOut, 422: ErrorOut},
    summary="Save one file as a new version",
)
def flows_file_save(request: HttpRequest, flow_id: int, path: str, payload: FileSaveIn) -> Status:
    """Save one file on top of `based_on`; 409 with the head version when someone changed it meanwhile."""
    user = _user(request)
    flow = _editable_flow(request, flow_id)
    try:
        content = (
            base64.b64decode(payload.content, validate=True)
            if payload.encoding == "base64"
            else payload.content.encode()
        )
    except binascii.Error:
        return Status(
            422, ErrorOut(detail="content is not valid base64.", errors={"content": ["not valid base64"]})
        )
    try:
        version = flow_file_save(
            flow=flow,
            user=user,
            path=path,
            content=content,
            based_on=payload.based_on,
            message=payload.message,
        )
    except FlowPathError as error:
        return Status(400, _refused(error))
    except FlowConflict as error:
        return Status(409, _conflict(error))
    except ValidationError as error:
        return Status(422, _error(error))
    return Status(201, _version_out(version))


@flows_router.delete(
    "/flows/{flow_id}/files/{path:path}",
    response={201: VersionOut, 400: RefusedOut, 403: ErrorOut, 404: ErrorOut, 409: ConflictOut},
    summary="Delete a file or folder as a new version",
)
def flows_file_delete(request: HttpRequest, flow_id: int, path: str, based_on: int) -> Status:
    """Delete one file or a whole folder on top of `based_on`."""
    user = _user(request)
    flow = _editable_flow(request, flow_id)
    try:
        version = flow_file_delete(flow=flow, user=user, path=path, based_on=based_on)
    except FlowPathError as error:
        if error.reason == "not_found":
            return Status(404, ErrorOut(detail=str(error)))
        return Status(400, _refused(error))
    except FlowConflict as error:
        return Status(409, _conflict(error))
    return Status(201, _version_out(version))


@flows_router.post(
    "/flows/{flow_id}/import",
    response={
        201: VersionOut,
        400: RefusedOut,
        403: ErrorOut,
        409: ConflictOut,
        413: ErrorOut,
        422: ErrorOut,
    },
    summary="Import a zip as a new version of a flow",
)
def flows_import_version(
    request: HttpRequest,
    flow_id: int,
    file: File[UploadedFile],
    based_on: Form[int | None] = None,
    message: Form[str] = "",
) -> Status:
    """Replace the flow's files with a zip's, as a new version (`flowstudio flow push`); without `based_on`
    the version goes on top of the current head (history keeps the previous one)."""
    user = _user(request)
    flow = _editable_flow(request, flow_id)
    try:
        version = flow_import_zip(
            owner=user, data=_upload_bytes(file), into=flow, based_on=based_on, message=message
        )
    except FlowImportError as error:
        return Status(400, _refused(error))
    except FlowConflict as error:
        return Status(409, _conflict(error))
    except ValidationError as error:
        return Status(422, _error(error))
    return Status(201, _version_out(version))


@flows_router.get("/flows/{flow_id}/export", summary="Download a flow as a zip", openapi_extra=ZIP_RESPONSE)
def flows_export(request: HttpRequest, flow_id: int, version: int | None = None) -> HttpResponse:
    """The head (or `version`) as a zip; byte-identical for the same files."""
    flow_version = flow_version_get_for(_user(request), flow_id, version)
    filename = f"{flow_version.flow.name}-v{flow_version.number}.zip"
    return _zip_response(snapshot_zip(snapshot=flow_version.snapshot), filename)


@flows_router.get(
    "/snapshots/{sha256}/export", summary="Download a snapshot as a zip", openapi_extra=ZIP_RESPONSE
)
def snapshots_export(request: HttpRequest, sha256: str) -> HttpResponse:
    """Any snapshot of a flow version you can see, as a zip."""
    snapshot = snapshot_get_for(_user(request), sha256)
    return _zip_response(snapshot_zip(snapshot=snapshot), f"snapshot-{snapshot.sha256[:12]}.zip")


@flows_router.get("/flows/{flow_id}/shares", response=list[ShareOut], summary="Who a flow is shared with")
def flows_shares(request: HttpRequest, flow_id: int) -> list[dict[str, Any]]:
    """The users and teams a flow is shared with, and their roles."""
    return [_share_out(share) for share in flow_shares_for(_user(request), flow_id)]


def _share_out(share: FlowShare) -> dict[str, Any]:
    return {
        "user": share.user.get_username() if share.user_id else None,
        "team": share.team.name if share.team_id else None,
        "role": share.role,
    }


def _share_target(payload: ShareIn) -> dict[str, Any]:
    from django.contrib.auth import get_user_model

    from accounts_app.models import Team

    target: dict[str, Any] = {}
    if payload.user:
        found = get_user_model()._default_manager.filter(username=payload.user).first()
        if found is None:
            raise ValidationError({"user": f"There is no user named '{payload.user}'."})
        target["user"] = found
    if payload.team:
        team = Team.objects.filter(name=payload.team).first()
        if team is None:
            raise ValidationError({"team": f"There is no team named '{payload.team}'."})
        target["team"] = team
    return target


@flows_router.post(
    "/flows/{flow_id}/shares",
    response={201: ShareOut, 403: ErrorOut, 422: ErrorOut},
    summary="Share a flow with a user or a team",
)
def flows_share(request: HttpRequest, flow_id: int, payload: ShareIn) -> Status:
    """Share a flow you own as viewer or editor; sharing again changes the role."""
    user = _user(request)
    flow = flow_get_for(user, flow_id)
    try:
        share = flow_share(flow=flow, by=user, role=payload.role, **_share_target(payload))
    except PermissionDenied as denied:
        return Status(403, ErrorOut(detail=str(denied)))
    except ValidationError as error:
        return Status(422, _error(error))
    return Status(201, _share_out(share))


@flows_router.delete(
    "/flows/{flow_id}/shares",
    response={204: None, 403: ErrorOut, 422: ErrorOut},
    summary="Stop sharing a flow",
)
def flows_unshare(
    request: HttpRequest, flow_id: int, user: str | None = None, team: str | None = None
) -> Status:
    """Stop sharing a flow you own with a user or a team."""
    caller = _user(request)
    flow = flow_get_for(caller, flow_id)
    try:
        flow_unshare(flow=flow, by=caller, **_share_target(ShareIn(user=user, team=team)))
    except PermissionDenied as denied:
        return Status(403, ErrorOut(detail=str(denied)))
    except ValidationError as error:
        return Status(422, _error(error))
    return Status(204, None)
