"""C-STORE statuses the node answers with (PS3.4 B.2.3 and PS3.7 C).

One table, so the handler, `import` and the docs agree on what each means.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    SUCCESS = 0x0000
    # General status, PS3.7 C.4: another object already holds this SOP Instance UID.
    DUPLICATE_SOP_INSTANCE = 0x0111
    OUT_OF_RESOURCES = 0xA700        # disk full, database unavailable
    SOP_CLASS_MISMATCH = 0xA900      # data set does not match the SOP Class
    CANNOT_PARSE = 0xC000            # cannot understand: truncated or malformed
    MISSING_UID = 0xC001             # cannot understand: Study/Series/SOP Instance UID absent
    INSTANCE_MISMATCH = 0xC002       # data set's SOP Instance UID is not the request's
    PROCESSING_FAILURE = 0x0110      # unexpected error inside the node


class IngestFailure(Exception):
    """An instance the node will not store; `status` is what the sender is told."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
