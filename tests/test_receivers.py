"""Receiver processes (`node.receivers`): one port, several interpreters; the node-wide association
limit; a receiver killed mid-transfer is restarted and loses nothing it acknowledged; `serve`
stops them all."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from pydicom.uid import ExplicitVRLittleEndian

from tests.test_crash_safety import Transfer, check_consistent, make_instances, wait_for

pytestmark = pytest.mark.timeout(180)


def receiver_pids(node) -> dict[int, int]:
    """receiver index -> pid of its latest start, from the pool's log lines."""
    return {int(i): int(pid) for i, pid in re.findall(r"receiver (\d+) started as pid (\d+)", node.log())}


def associate(port: int):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    return ae.associate("127.0.0.1", port, ae_title="LINKNODE")


def test_two_receivers_share_the_port_and_both_store(start_node, tmp_path):
    node = start_node(node={"receivers": 2})
    assert "(2 receiver processes)" in node.log()
    pids = receiver_pids(node)
    assert sorted(pids) == [0, 1] and all(os.kill(pid, 0) is None for pid in pids.values())
    sent = make_instances(tmp_path / "outbox", 24)
    for uid, item in sent.items():         # one association each: the kernel spreads the connections
        assoc = associate(node.port)
        assert assoc.is_established
        assert assoc.send_c_store(item.path).Status == 0x0000
        assoc.release()
    stored_by = set(re.findall(r"\[receiver (\d)\] dicom_node\.ingest: stored", node.log()))
    assert stored_by == {"0", "1"}, node.log()[-3000:]
    check_consistent(node, sent, set(sent), set())
    node.process.send_signal(signal.SIGHUP)             # reaches every receiver
    wait_for(lambda: len(re.findall(r"\[receiver \d\] dicom_node: SIGHUP: allow-list reloaded", node.log())) == 2,
             20, "both receivers reloading", node)
    assert node.stop() == 0
    assert not any(_alive(pid) for pid in pids.values()), "a receiver outlived serve"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:     # a zombie is gone for our purposes
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_max_associations_holds_across_receivers(start_node):
    node = start_node(node={"receivers": 2, "max_associations": 2})
    held = [associate(node.port) for _ in range(6)]
    established = [a for a in held if a.is_established]
    assert len(established) == 2, [a.is_established for a in held]
    assert all(a.is_rejected for a in held if not a.is_established)
    established[0].release()
    time.sleep(0.5)                     # the slot is given back when the connection closes
    again = associate(node.port)
    assert again.is_established
    for assoc in (established[1], again):
        assoc.release()


def test_a_receiver_killed_mid_transfer_is_restarted_and_loses_nothing_acknowledged(start_node, tmp_path):
    node = start_node(node={"receivers": 2}, storage={"min_free_bytes": 0})
    sent = make_instances(tmp_path / "outbox", 120)
    items = list(sent.items())
    transfer = Transfer(node.port, items)
    thread = transfer.start()
    wait_for(lambda: len(transfer.acked) >= 30 or not thread.is_alive(), 60, "30 acknowledgements", node)
    serving = re.findall(r"\[receiver (\d)\] dicom_node\.ingest: stored", node.log())[-1]
    victim = receiver_pids(node)[int(serving)]
    os.kill(victim, signal.SIGKILL)
    thread.join(30)
    assert not thread.is_alive() and transfer.error is None, transfer.error
    assert 30 <= len(transfer.acked) < len(items), "the kill landed after the transfer"
    wait_for(lambda: f"receiver {serving} (pid {victim}) exited with -9; starting a new one" in node.log(), 30,
             "the restart", node)
    wait_for(lambda: receiver_pids(node)[int(serving)] != victim, 30, "a new receiver", node)
    time.sleep(1.0)
    unacked = set(transfer.attempted) - set(transfer.acked)
    # The sender re-sends what it was not told was stored; both receivers take it.
    rest = Transfer(node.port, [(uid, s) for uid, s in items if uid not in set(transfer.acked)])
    rest.run()
    assert rest.error is None and not rest.other and len(rest.acked) == len(rest.items), rest.other
    rows = check_consistent(node, sent, set(transfer.acked) | set(rest.acked), unacked)
    assert rows.keys() == sent.keys()
    assert node.stop() == 0
