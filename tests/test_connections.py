"""Association slots and who may associate: half-open connections, setup deadline, AE titles."""

from __future__ import annotations

import socket
import struct
import time

import pynetdicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.connections import ConnectionGuard
from tests.helpers import corpus_path, echo


def silent_connections(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sockets.append(sock)
    return sockets


def closed_by_node(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def timed_echo(port: int, **kwargs) -> tuple[bool, float]:
    started = time.monotonic()
    ok = echo(port, **kwargs)
    return ok, time.monotonic() - started


def test_silent_connections_do_not_take_association_slots(start_node):
    """200 bare TCP connections (port scans, health checks) against 10 slots: a real sender
    still gets C-ECHO and C-STORE answered within a second."""
    node = start_node(node={"max_associations": 10, "max_pending_connections": 20})
    sockets = silent_connections(node.port, 200)
    try:
        time.sleep(0.5)
        ok, seconds = timed_echo(node.port)
        assert ok and seconds < 1.0, (ok, seconds)
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(CTImageStorage)
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", node.port, ae_title="LINKNODE")
        assert assoc.is_established
        status = assoc.send_c_store(str(corpus_path("explicit_le")))
        assoc.release()
        assert status.Status == 0x0000 and time.monotonic() - started < 1.0
        # The oldest silent ones were closed to make room; at most the budget stays open.
        still_open = [s for s in sockets if not closed_by_node(s, 0.01)]
        assert len(still_open) <= 20
    finally:
        for sock in sockets:
            sock.close()


def test_a_connection_without_an_association_request_is_closed_at_the_setup_deadline(start_node):
    node = start_node(node={"association_setup_timeout_s": 1.0})
    silent = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    # An A-ASSOCIATE-RQ dripped a byte at a time: header says 200 bytes, only 6 come.
    drip = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    drip.sendall(struct.pack(">BBL", 0x01, 0x00, 200))
    try:
        assert closed_by_node(silent, 4.0)
        assert closed_by_node(drip, 1.0)
    finally:
        silent.close()
        drip.close()
    assert echo(node.port)


def test_negotiated_associations_are_limited_and_the_limit_is_reported(start_node):
    node = start_node(node={"max_associations": 2})
    holders = []
    for _ in range(2):
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="LINKNODE")
        assert assoc.is_established
        holders.append(assoc)
    third = AE(ae_title="PYNETDICOM")
    third.add_requested_context(Verification)
    rejected = third.associate("127.0.0.1", node.port, ae_title="LINKNODE")
    assert rejected.is_rejected
    for assoc in holders:
        assoc.release()
    assert echo(node.port)          # a released association's slot is free at once
    assert "2 associations are open (node.max_associations)" in node.log()


@pytest.mark.parametrize("called, calling", [("LINK_NODE", "ECHOSCU"), ("LINKNODE", "ECHOSCU\n"),
                                             ("LINKNODE", "\tECHOSCU")])
def test_wrong_called_or_malformed_calling_ae_titles_are_rejected(start_node, monkeypatch, called, calling):
    node = start_node(security={"peers": [{"ae_title": "ECHOSCU", "hosts": []}, {"ae_title": "ECHO", "hosts": []}]})
    # pynetdicom checks the AE titles it sends; this sender must send a malformed one.
    monkeypatch.setitem(pynetdicom._config.VALIDATORS, "AE", lambda value: (True, ""))
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=called)
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.diagnostic == (0x07 if called != "LINKNODE" else 0x03)
    assert echo(node.port)


def test_any_called_ae_title_is_accepted_when_the_check_is_off(start_node):
    node = start_node(node={"check_called_ae_title": False})
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ANY-SCP")
    assert assoc.is_established
    assoc.release()


class FakeAssoc:
    def __init__(self) -> None:
        self.closed = False
        self.requestor = type("R", (), {"address": "127.0.0.1"})()

    def is_alive(self) -> bool:
        return not self.closed


def test_guard_evicts_the_oldest_pending_connection_and_counts_only_admitted_ones(monkeypatch):
    closed = []
    monkeypatch.setattr("dicom_node.connections.close_connection", closed.append)
    guard = ConnectionGuard(max_associations=1, max_pending=2, setup_timeout_s=5)
    first, second, third = FakeAssoc(), FakeAssoc(), FakeAssoc()
    for assoc in (first, second, third):
        guard.on_conn_open(type("E", (), {"assoc": assoc})())
    assert closed == [first]
    assert guard.admit(second) and not guard.admit(third)
    assert guard.pending_count() == 0
    second.closed = True                     # its thread ended: the slot is free again
    assert guard.admit(third)
    late = FakeAssoc()
    guard.on_conn_open(type("E", (), {"assoc": late})())
    assert guard.reap(time.monotonic() + 6) == 1 and closed[-1] is late
