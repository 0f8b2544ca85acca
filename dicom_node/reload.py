"""The allow-list reloaded while the node runs: `[[security.peers]]` and `security.require_known_ae`
from node.toml on SIGHUP or when the file changes (`serve`, and each receiver process on SIGHUP)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from dicom_node.config import ConfigError, Settings, load_settings

log = logging.getLogger("dicom_node")


# Seconds between two looks at the config file's modification time while `serve` runs.
CONFIG_POLL_S = 2.0


def _needs_restart(running: Settings, new: Settings) -> list[str]:
    """The sections of `new` that differ from those in force and are read only at start-up."""
    changed = [name for name in Settings.model_fields
               if name not in ("security", "base_dir") and getattr(running, name) != getattr(new, name)]
    return changed + (["security.tls"] if running.security.tls != new.security.tls else [])


class AllowListReloader:
    """Puts a new `[[security.peers]]` / `security.require_known_ae` in force while `serve` runs.

    A new sender should not need a restart, which would drop every open association. The
    config file is re-read on SIGHUP and when its modification time or size changes, and is
    validated as at start-up (host names resolved again); a file that fails keeps the allow-list
    in force. Only the allow-list is taken: other settings need a restart, and a change to them
    is logged as not applied.
    """

    def __init__(self, scp, settings: Settings, path: Path | None, poll_s: float | None = CONFIG_POLL_S) -> None:
        self.scp, self.running, self.poll_s = scp, settings, poll_s
        self.path = path.resolve() if path is not None else None
        self.requested = threading.Event()
        self.seen = self._signature()

    def _signature(self) -> tuple[int, int, int] | None:
        # Size and inode too: an editor that saves by renaming, or a rewrite within the file
        # system's timestamp granularity, still shows up.
        try:
            stat = self.path.stat() if self.path is not None else None
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino) if stat else None

    def request(self) -> None:
        """SIGHUP: only sets an event; the watcher thread reads the file (and may resolve host
        names), not the signal handler."""
        self.requested.set()

    def reload(self, why: str) -> bool:
        if self.path is None:
            log.warning("%s: serve was started without a config file, so there is no allow-list to reload", why)
            return False
        # Taken before reading: a write that lands while the file is read is seen at the next look.
        self.seen = self._signature()
        try:
            new = load_settings(self.path)
            policy = self.scp.reload_policy(new.security)
        except (ConfigError, OSError, ValueError) as error:
            log.error("%s: %s not reloaded; the allow-list in force stays: %s", why, self.path.name, error)
            return False
        security = self.running.security.model_copy(
            update={"peers": new.security.peers, "require_known_ae": new.security.require_known_ae})
        self.running = self.running.model_copy(update={"security": security})
        titles = sorted(policy.rules)
        log.info("%s: allow-list reloaded from %s: %d peers now allowed (%s)%s", why, self.path,
                 len(new.security.peers), ", ".join(titles) or "none",
                 "" if policy.require_known_ae else "; require_known_ae = false: any calling AE title is admitted")
        restart = _needs_restart(self.running, new)
        if restart:
            log.warning("%s: changes to %s are not applied: only [[security.peers]] and security.require_known_ae "
                        "are reloaded, other settings need a restart", why, ", ".join(f"[{name}]" for name in restart))
        return True

    def watch(self, stop: threading.Event) -> threading.Thread:
        """Reload on request (SIGHUP) and, with a poll interval, when the file changes."""
        def run() -> None:
            while not stop.is_set():
                try:
                    if self.requested.wait(self.poll_s):
                        self.requested.clear()
                        if not stop.is_set():
                            self.reload("SIGHUP")
                    elif self.path is not None and self._signature() != self.seen:
                        self.reload(f"{self.path.name} changed")
                except Exception:       # the watcher must outlive any one bad reload
                    log.exception("reloading the allow-list failed; the allow-list in force stays")

        thread = threading.Thread(target=run, name="config-watch", daemon=True)
        thread.start()
        return thread
