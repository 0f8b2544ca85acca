"""Who may associate, checked with DCMTK's echoscu against a running `serve`: a wrong called AE
title is refused, and a sender added to [[security.peers]] is admitted without a restart (on
SIGHUP, or once the file watcher sees node.toml change); a broken node.toml keeps the old list."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.helpers import need, write_toml

pytestmark = pytest.mark.dcmtk

NEW_PEER = '\n[[security.peers]]\nae_title = "NEWPEER"\nhosts = ["127.0.0.1"]\n'


def echoscu(node, calling: str = "ECHOSCU", called: str = "LINKNODE") -> subprocess.CompletedProcess:
    return subprocess.run([need("echoscu"), "-aet", calling, "-aec", called, "-to", "10", "127.0.0.1",
                           str(node.port)], capture_output=True, text=True, timeout=30)


def wait_for_log(node, text: str, after: int, timeout: float = 15.0) -> str:
    """The node's log written since offset `after`, once it contains `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = node.log()[after:]
        if text in new:
            return new
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged within {timeout} s:\n{node.log()[after:]}")


def test_dcmtk_echoscu_calling_a_wrong_called_ae_title_is_rejected_and_the_reason_logged(start_node):
    node = start_node()
    run = echoscu(node, called="LINK_NODE")
    assert run.returncode != 0
    assert "Called AE Title Not Recognized" in run.stdout + run.stderr, run.stdout + run.stderr
    assert ("rejected association from 127.0.0.1: it called AE title 'LINK_NODE', this node is 'LINKNODE'"
            in node.log()), node.log()
    assert echoscu(node).returncode == 0


def test_sighup_puts_a_new_peer_in_force_without_a_restart(start_node):
    node = start_node()
    pid = node.process.pid
    refused = echoscu(node, calling="NEWPEER")
    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    # The peer is appended and a comment line of the same length dropped, and the modification
    # time put back: the file watcher cannot see this edit, so only SIGHUP can put it in force.
    padding = "#" * (len(NEW_PEER) - 1) + "\n"
    path = node.config_path
    offset = len(node.log())
    path.write_text(path.read_text() + padding)
    wait_for_log(node, "node.toml changed: allow-list reloaded", offset)      # the padded file is the one seen
    before = path.stat()
    path.write_text(path.read_text().replace(padding, "") + NEW_PEER)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    time.sleep(3)                               # the watcher has looked at least once
    assert echoscu(node, calling="NEWPEER").returncode != 0

    offset = len(node.log())
    node.process.send_signal(signal.SIGHUP)
    logged = wait_for_log(node, "SIGHUP: allow-list reloaded", offset)
    assert "6 peers now allowed" in logged and "NEWPEER" in logged, logged
    admitted = echoscu(node, calling="NEWPEER")
    assert admitted.returncode == 0, admitted.stdout + admitted.stderr + node.log()[offset:]
    assert echoscu(node).returncode == 0                       # the peers listed before still are
    assert node.process.poll() is None and node.process.pid == pid


def test_a_rewritten_node_toml_is_picked_up_and_a_broken_one_keeps_the_peers_in_force(start_node):
    node = start_node()
    assert echoscu(node, calling="NEWPEER").returncode != 0

    # The file rewritten as an operator would, no signal: the watcher sees the new modification time.
    config = dict(node.config)
    config["security"] = dict(config["security"], peers=config["security"]["peers"] +
                              [{"ae_title": "NEWPEER", "hosts": ["127.0.0.1"]}])
    config["series"] = dict(config["series"], stable_after_s=9.0)
    offset = len(node.log())
    write_toml(node.config_path, config)
    logged = wait_for_log(node, "allow-list reloaded", offset)
    assert "node.toml changed" in logged and "NEWPEER" in logged, logged
    # Other settings are read at start-up only, and the log says so.
    assert "changes to [series] are not applied" in wait_for_log(node, "need a restart", offset)
    admitted = echoscu(node, calling="NEWPEER")
    assert admitted.returncode == 0, admitted.stdout + admitted.stderr + node.log()[offset:]

    # Not TOML: an error is logged, the peers in force stay.
    offset = len(node.log())
    node.config_path.write_text(node.config_path.read_text() + "[[security.peers]\n")
    logged = wait_for_log(node, "not reloaded", offset)
    assert "ERROR" in logged and "not valid TOML" in logged, logged
    assert echoscu(node, calling="NEWPEER").returncode == 0 and echoscu(node).returncode == 0

    # Valid TOML, but a host that does not resolve: the same. NEWPEER is left out of this file,
    # so if it were applied NEWPEER would be refused.
    config["security"] = dict(config["security"], peers=[{"ae_title": "ECHOSCU", "hosts": ["no-such-host.invalid"]}])
    offset = len(node.log())
    write_toml(node.config_path, config)
    logged = wait_for_log(node, "not reloaded", offset)
    assert "no-such-host.invalid" in logged and "does not resolve" in logged, logged
    assert echoscu(node, calling="NEWPEER").returncode == 0 and echoscu(node).returncode == 0
    # SIGHUP with the file still broken: the same answer, and the node keeps running.
    offset = len(node.log())
    node.process.send_signal(signal.SIGHUP)
    assert "does not resolve" in wait_for_log(node, "SIGHUP", offset)
    assert node.process.poll() is None
