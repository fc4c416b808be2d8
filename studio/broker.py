"""The embedded default's broker: kombu's filesystem transport, with messages that enter their folder whole.

kombu's own `_put` creates the message file in the queue folder and then writes it, while a consumer takes any
`*.msg` file it lists: a worker that polls in between reads an empty message and stops ("Unrecoverable error").
Here a message is written beside the folder's messages under a name no consumer takes, then renamed into
place in one step. Messages are named so the folder's order is the order they were sent: kombu's name has
the millisecond and then a random part, so messages sent in the same millisecond came out in any order.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic_ns
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        """Put `payload` onto `queue`, after the messages sent before it, visible only when complete."""
        sent = monotonic_ns()
        # kombu's millisecond first (the folder's order), then the nanosecond: first in, first out.
        name = f"{sent // 1_000_000}_{sent:020d}-{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".part"
        try:
            with open(partial, "wb", buffering=0) as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class FilesystemTransport(filesystem.Transport):
    Channel = Channel
