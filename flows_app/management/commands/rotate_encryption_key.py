"""manage.py rotate_encryption_key: put a new key first and re-encrypt every connection's secrets."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from flows_app.services import (
    ConnectionSecretsUnreadable,
    connection_secrets_reencrypt,
    encryption_key_file_path,
    encryption_key_file_prepend,
    encryption_key_new,
    encryption_keys_from_file,
)


class Command(BaseCommand):
    """Rotate the key that encrypts connection secrets."""

    help = (
        "Keys in the data-dir file: generate a new key, put it first in the file and re-encrypt every "
        "connection under it. Keys in STUDIO_ENCRYPTION_KEYS: print a new key to add first in that variable, "
        "then, after a restart, run again with --reencrypt. Restart the studio and its workers afterwards."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """--reencrypt: only re-encrypt every row under the current first key."""
        parser.add_argument(
            "--reencrypt",
            action="store_true",
            help="Do not make a key; re-encrypt every connection under the first configured key.",
        )

    def handle(self, *args: Any, reencrypt: bool = False, **options: Any) -> None:
        """Parse the mode and call the services."""
        try:
            if reencrypt:
                count = connection_secrets_reencrypt()
                self.stdout.write(f"Re-encrypted {count} connection(s) under the first configured key.")
                return
            if not encryption_keys_from_file():
                key = encryption_key_new()
                self.stdout.write(
                    "The keys come from STUDIO_ENCRYPTION_KEYS, which this command cannot change.\n"
                    f"1. Put this new key first in STUDIO_ENCRYPTION_KEYS (keep the old ones after it):\n{key}\n"
                    "2. Restart the studio and its workers.\n"
                    "3. Run `manage.py rotate_encryption_key --reencrypt`; then the old keys may be removed."
                )
                return
            keys = encryption_key_file_prepend(key=encryption_key_new())
            count = connection_secrets_reencrypt(keys=keys)
        except ConnectionSecretsUnreadable as error:
            raise CommandError(str(error)) from None
        self.stdout.write(
            f"Wrote a new first key to {encryption_key_file_path()} ({len(keys)} key(s) in it) and re-encrypted "
            f"{count} connection(s). Restart the studio and its workers so they encrypt with the new key."
        )
