"""`manage.py create_token --user NAME [--name LABEL]`: print a new personal access token."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts_app.services import token_create


class Command(BaseCommand):
    """Create a personal access token for a user and print it (the only time it is shown)."""

    help = "Create a personal access token for a user and print it; only its hash is stored."

    def add_arguments(self, parser: CommandParser) -> None:
        """--user and --name."""
        parser.add_argument("--user", required=True, help="username of the token's owner")
        parser.add_argument("--name", default="cli", help="what the token is for (default: cli)")

    def handle(self, *args: Any, **options: Any) -> None:
        """Create the token and print its plaintext alone on stdout."""
        user_model = get_user_model()
        try:
            user = user_model._default_manager.get_by_natural_key(options["user"])
        except user_model.DoesNotExist:
            raise CommandError(f"No user named {options['user']!r}.") from None
        created = token_create(user=user, name=options["name"])
        self.stderr.write(f"Token {created.token.name!r} for {user.get_username()} (shown only now):")
        self.stdout.write(created.plaintext)
