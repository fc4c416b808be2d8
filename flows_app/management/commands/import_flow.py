"""manage.py import_flow: import a prompt flow folder or a zip of one as a new flow owned by a user."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from flows_app.services import FlowImportError, FlowPathError, files_from_folder, flow_create, flow_import_zip


class Command(BaseCommand):
    """Import a flow folder or zip for a user (the same checks as an upload in the studio)."""

    help = (
        "Import a flow folder (flow.dag.yaml, flow.flex.yaml or a .prompty) or a zip of one as a new flow. "
        "`.promptflow/` and `__pycache__/` are left out; links and unsafe names are refused."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """PATH, --user and an optional --name."""
        parser.add_argument("path", help="A flow folder or a .zip file.")
        parser.add_argument("--user", required=True, help="Username of the new flow's owner.")
        parser.add_argument("--name", help="The flow's name (default: the folder or zip's name).")

    def handle(self, *args: Any, path: str, user: str, name: str | None = None, **options: Any) -> None:
        """Parse the arguments and call the import services."""
        owner = get_user_model()._default_manager.filter(username=user).first()
        if owner is None:
            raise CommandError(f"There is no user named '{user}'.")
        source = Path(path)
        try:
            if source.is_dir():
                flow = flow_create(
                    owner=owner,
                    name=name or source.resolve().name,
                    files=files_from_folder(root=source),
                    message=f"Import of the folder {source.resolve().name}",
                )
                version = flow.head
            elif source.is_file():
                version = flow_import_zip(owner=owner, data=source.read_bytes(), name=name or source.stem)
            else:
                raise CommandError(f"{path}: no such file or folder.")
        except (FlowPathError, FlowImportError) as error:
            raise CommandError(f"{path}: {error}") from None
        except ValidationError as error:
            raise CommandError(f"{path}: {'; '.join(error.messages)}") from None
        assert version is not None
        self.stdout.write(
            f"Imported '{version.flow.name}' (id {version.flow_id}): {version.snapshot.file_count} files, "
            f"version {version.number}."
        )
