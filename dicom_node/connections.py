"""Who gets an association slot: negotiated associations only, and half-open connections apart.

pynetdicom counts every open connection against `maximum_associations`, including ones
that never send an A-ASSOCIATE-RQ, so ten port probes or load-balancer health checks
lock every sender out, and an RQ dripped a byte at a time holds a slot indefinitely
(its reader blocks until the whole PDU has arrived). Here:

* a connection is *pending* from accept until its A-ASSOCIATE-RQ arrives. Until its first
  byte it is only a socket waited on in its own thread (`wait_for_first_bytes`): pynetdicom
  builds no association for it. Pending connections have their own budget
  (`max_pending_connections`); when it is full the oldest one is closed to make room, so
  a flood of silent sockets cannot keep a real sender out. A connection still without a
  whole RQ `association_setup_timeout_s` after it was accepted is closed.
* an *admitted* association takes one of `max_associations` slots once its RQ is
  accepted; further RQs are rejected (transient, local limit exceeded).

Closing means shutting the socket down: pynetdicom's reader then sees the connection
end and its threads finish as for any dropped peer.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable

log = logging.getLogger("dicom_node.connections")
# An A-ASSOCIATE-RQ's Called and Calling AE Title fields end at byte 42 (PS3.8 table 9-11).
_RQ_TITLES_END = 42


def _shutdown(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer


def close_connection(assoc) -> None:
    """Shut the association's socket down (its DUL thread sees end-of-stream and stops)."""
    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if raw is not None:
        _shutdown(raw)
    _stop_waiting_for_request(assoc)


def _stop_waiting_for_request(assoc) -> None:
    """An acceptor waits for its A-ASSOCIATE-RQ on a queue for up to acse_timeout even after the
    connection has gone; meanwhile pynetdicom counts it as an association. An empty item ends
    that wait at once (pynetdicom reads it as "no request" and closes)."""
    queue = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    if queue is not None:
        queue.put(None)


class _ThrottledLog:
    """One warning per `every_s` with a count, not one per probe: a port scan must not flood the log."""

    def __init__(self, message: str, every_s: float = 10.0) -> None:
        self.message, self.every_s = message, every_s
        self.count, self.last = 0, float("-inf")
        self.lock = threading.Lock()

    def __call__(self, *args) -> None:
        with self.lock:
            self.count += 1
            now = time.monotonic()
            if now - self.last < self.every_s:
                return
            count, self.count, self.last = self.count, 0, now
        log.warning(self.message + " (%d in the last %.0f s)", *args, count, self.every_s)


class ConnectionGuard:
    def __init__(self, max_associations: int, max_pending: int, setup_timeout_s: float, shared=None) -> None:
        self.max_associations = max_associations
        # Receiver processes (dicom_node.receivers): slots counted across all of them as well.
        self.shared = shared
        self._counted: set = set()
        self.max_pending = max_pending
        self.setup_timeout_s = setup_timeout_s
        self._lock = threading.Lock()
        # socket or association -> (monotonic time of accept, how to close it)
        self._pending: dict[object, tuple[float, Callable[[], None]]] = {}
        self._admitted: weakref.WeakSet = weakref.WeakSet()
        self._accepted = threading.local()     # accept time, from the socket's wait to its association
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._evicted = _ThrottledLog("closed connections that sent no A-ASSOCIATE-RQ: %d were waiting")
        self._late = _ThrottledLog("closed connections without a whole A-ASSOCIATE-RQ within %.0f s")

    def _add_pending(self, key, since: float, close: Callable[[], None]) -> None:
        with self._lock:
            self._pending[key] = (since, close)
            excess = len(self._pending) - self.max_pending
            victims = sorted(self._pending, key=lambda k: self._pending[k][0])[:excess] if excess > 0 else []
            closers = [self._pending.pop(victim)[1] for victim in victims]
        for close_victim in closers:
            self._evicted(self.max_pending)
            close_victim()

    # ----- before pynetdicom sees the connection ---------------------------------------------

    def wait_for_first_bytes(self, sock) -> bool:
        """In the connection's own thread: wait until the peer sends something, at most until the
        setup deadline. False: the connection was silent, closed, or evicted; drop it."""
        accepted = time.monotonic()
        self._accepted.at = accepted
        self._add_pending(sock, accepted, lambda: _shutdown(sock))
        try:
            readable = select.select([sock], [], [], self.setup_timeout_s)[0]
        except (OSError, ValueError):
            readable = []
        finally:
            with self._lock:
                self._pending.pop(sock, None)
        if not readable:
            self._late(self.setup_timeout_s)
            return False
        if isinstance(sock, ssl.SSLSocket):
            return True            # the TLS handshake comes next and has its own time limit
        return self._peek_titles(sock, accepted)

    def _peek_titles(self, sock, accepted: float) -> bool:
        """Keep the A-ASSOCIATE-RQ's AE title fields as sent: pynetdicom strips them (a calling
        AE title "ECHOSCU\n" reads as "ECHOSCU"), so a malformed title could not be refused."""
        self._accepted.titles = None
        previous = sock.gettimeout()
        try:
            sock.settimeout(max(0.01, self.setup_timeout_s - (time.monotonic() - accepted)))
            head = sock.recv(_RQ_TITLES_END, socket.MSG_PEEK | socket.MSG_WAITALL)
        except (OSError, TimeoutError):
            return False
        finally:
            try:
                sock.settimeout(previous)
            except OSError:
                pass
        if not head:
            return False                         # connect-and-close, or evicted while waiting
        if head[0] == 0x01 and len(head) == _RQ_TITLES_END:
            self._accepted.titles = (head[10:26], head[26:42])   # PS3.8 9.3.2: called, then calling
        return True

    # ----- pynetdicom events ------------------------------------------------------------

    def on_conn_open(self, event) -> None:
        """EVT_CONN_OPEN: the connection has an association object; it stays pending until its RQ."""
        assoc = event.assoc
        assoc.raw_ae_titles = getattr(self._accepted, "titles", None)
        since = getattr(self._accepted, "at", None) or time.monotonic()
        self._add_pending(assoc, since, lambda: close_connection(assoc))

    def on_conn_close(self, event) -> None:
        with self._lock:
            was_pending = self._pending.pop(event.assoc, None) is not None
            counted = event.assoc in self._counted
            self._counted.discard(event.assoc)
        if counted:
            self.shared.give()
        if was_pending:
            _stop_waiting_for_request(event.assoc)

    def admit(self, assoc) -> bool:
        """The RQ arrived: leave the pending budget; take a slot if one is free."""
        with self._lock:
            self._pending.pop(assoc, None)
            active = sum(1 for other in self._admitted if other is not assoc and _holds_slot(other))
            if active >= self.max_associations:
                return False
            if self.shared is not None:
                if not self.shared.take():
                    return False
                self._counted.add(assoc)
            self._admitted.add(assoc)
            return True

    def release(self, assoc) -> None:
        """An association rejected after the RQ (allow-list, AE title) is no longer pending."""
        with self._lock:
            self._pending.pop(assoc, None)

    # ----- the deadline -----------------------------------------------------------------

    def start(self) -> None:
        self._reaper = threading.Thread(target=self._reap_forever, name="dicom-setup-deadline", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def reap(self, now: float | None = None) -> int:
        """Close pending connections past the setup deadline; return how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            late = [k for k, (since, _) in self._pending.items() if now - since > self.setup_timeout_s]
            closers = [self._pending.pop(key)[1] for key in late]
        for close in closers:
            self._late(self.setup_timeout_s)
            close()
        return len(closers)

    def _reap_forever(self) -> None:
        interval = min(1.0, self.setup_timeout_s / 4)
        while not self._stop.wait(interval):
            try:
                self.reap()
            except Exception:  # the deadline must keep running whatever one connection does
                log.exception("setup deadline check failed")


def _holds_slot(assoc) -> bool:
    # A released or aborted association's thread may still be winding down; its slot is free.
    return assoc.is_alive() and not (getattr(assoc, "is_released", False) or getattr(assoc, "is_aborted", False))
