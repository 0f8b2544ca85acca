"""Keep patient names and IDs out of logs unless `node.log_phi` is switched on."""

from __future__ import annotations

import hashlib


def redact(value: str | None, log_phi: bool = False) -> str:
    """A short stable pseudonym, so log lines about one patient can still be matched up."""
    if value is None:
        return "-"
    if log_phi:
        return value
    return "#" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:10]
