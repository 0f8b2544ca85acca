#!/usr/bin/env python3
"""Receivers for benchmarks/ingest.py: DCMTK `storescp`, Orthanc and the node as subprocesses, and the
process-group bookkeeping (CPU time, idleness, machine load) that keeps a measurement honest.

Kept apart from ingest.py so that the run (corpus, senders, scenarios, report) reads on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import free_port, write_toml  # noqa: E402  (the same helpers the tests use)

HOST = "127.0.0.1"
NODE_AE, STORESCP_AE, ORTHANC_AE, SENDER_AE = "LINKNODE", "STORESCP", "ORTHANC", "STORESCU"
STORESCP_OPTIONS = ["--fork", "-dhl", "-pdu", "131072", "+B"]


# ----- processes -------------------------------------------------------------------


class Processes:
    """Everything this benchmark started, killed (by its own process group) on cleanup."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 30.0) -> None:
        if process.poll() is None:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        # storescp --fork children share the group; make sure none outlives its parent.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if process.poll() is None:
            process.wait(10)
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in list(self.running):
            self.stop(process, signal.SIGKILL, grace_s=5)


def echo(port: int, called_ae: str, timeout: float = 2.0) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    assoc = ae.associate(HOST, port, ae_title=called_ae)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


def wait_ready(process: subprocess.Popen, port: int, called_ae: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode}:\n{tail(log)}")
        if echo(port, called_ae):
            return
        time.sleep(0.2)
    raise RuntimeError(f"receiver did not answer C-ECHO within {timeout:.0f}s:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def dcmtk_env() -> dict:
    return {**os.environ, "TCP_NODELAY": "1"}


def cpu_seconds(pgid: int) -> float | None:
    """user + system CPU of the live processes in process group `pgid` and of their reaped children,
    from /proc (Linux)."""
    total, found = 0.0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            # utime + stime, and cutime + cstime: storescp --fork's children, reaped, count too.
            total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")
            found = True
    return total if found else None


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def machine_busy(window_s: float = 0.5) -> float:
    """Fraction of all cores busy over `window_s` (0..1)."""
    busy0, total0 = cpu_jiffies()
    time.sleep(window_s)
    busy1, total1 = cpu_jiffies()
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_quiet(limit_s: float, threshold: float = 0.2) -> float:
    """Wait (up to limit_s) until other work leaves the cores idle; return the busy fraction seen last.

    On a shared machine a test suite running beside the benchmark halves the
    node's numbers; this does not stop work that starts mid-measurement, so the
    busy fraction during each measurement is recorded as well.
    """
    deadline = time.monotonic() + limit_s
    busy = machine_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = machine_busy(1.0)
    return busy


# ----- receivers -------------------------------------------------------------------


def parse_override(text: str):
    key, _, raw = text.partition("=")
    if "." not in key or not _:
        raise argparse.ArgumentTypeError(f"expected section.key=value, got {text!r}")
    section, name = key.split(".", 1)
    lowered = raw.lower()
    if lowered in ("true", "false"):
        value = lowered == "true"
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = raw
    return section, name, value


def write_node_config(workdir: Path, port: int, overrides: list) -> Path:
    sections = {
        "node": {"host": HOST, "port": port},
        "database": {"url": f"sqlite:///{workdir / 'node.db'}"},
        "storage": {"dir": str(workdir / "storage")},
        "security": {"require_known_ae": True,
                     "peers": [{"ae_title": ae, "hosts": [HOST]} for ae in (SENDER_AE, "ECHOSCU", "PYNETDICOM")]},
    }
    for section, name, value in overrides:
        sections.setdefault(section, {})[name] = value
    return write_toml(workdir / "node.toml", sections)


@dataclass
class Receiver:
    name: str
    called_ae: str
    port: int
    process: subprocess.Popen
    workdir: Path
    log: Path
    http_port: int | None = None        # Orthanc's REST API

    def stored(self) -> int:
        if self.name == "storescp":
            return sum(1 for p in (self.workdir / "out").rglob("*") if p.is_file())
        if self.name == "orthanc":
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/statistics", timeout=30) as answer:
                return int(json.load(answer)["CountInstances"])
        files = sum(1 for p in (self.workdir / "storage").rglob("*.dcm")
                    if p.is_file() and "tmp" not in p.relative_to(self.workdir / "storage").parts)
        with sqlite3.connect(f"file:{self.workdir / 'node.db'}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT count(*) FROM instance").fetchone()[0]
        return min(files, rows)


def start_storescp(processes: Processes, workdir: Path) -> Receiver:
    out = workdir / "out"
    out.mkdir(parents=True)
    port = free_port()
    log = workdir / "storescp.log"
    with open(log, "ab") as handle:
        process = processes.start(
            ["storescp", *STORESCP_OPTIONS, "-aet", STORESCP_AE, "-od", str(out), str(port)],
            stdout=handle, stderr=subprocess.STDOUT, env=dcmtk_env(), cwd=workdir)
    receiver = Receiver("storescp", STORESCP_AE, port, process, workdir, log)
    wait_ready(process, port, STORESCP_AE, log)
    return receiver


def start_orthanc(processes: Processes, workdir: Path) -> Receiver:
    """Debian's Orthanc with its shipped storage settings (its own fsync policy, SQLite index,
    no compression), only ports, paths and AE title set; no plugins."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    config = {"Name": "ingest-bench", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
              "DicomAet": ORTHANC_AE, "DicomPort": port, "HttpPort": http_port, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": [], "DicomCheckCalledAet": False}
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = workdir / "orthanc.log"
    with open(log, "ab") as handle:
        process = processes.start(["Orthanc", str(workdir / "orthanc.json")], stdout=handle,
                                  stderr=subprocess.STDOUT, env=dcmtk_env(), cwd=workdir)
    receiver = Receiver("orthanc", ORTHANC_AE, port, process, workdir, log, http_port)
    wait_ready(process, port, ORTHANC_AE, log)
    wait_idle(process.pid)
    return receiver


def start_node(processes: Processes, workdir: Path, node_root: Path, overrides: list) -> Receiver:
    workdir.mkdir(parents=True)
    port = free_port()
    config = write_node_config(workdir, port, overrides)
    log = workdir / "node.log"
    env = {**os.environ, "TCP_NODELAY": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(node_root), os.environ.get("PYTHONPATH")]))}
    with open(log, "ab") as handle:
        process = processes.start([sys.executable, "-m", "dicom_node", "--config", str(config), "serve"],
                                  stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=node_root)
    receiver = Receiver("node", NODE_AE, port, process, workdir, log)
    wait_ready(process, port, NODE_AE, log)
    wait_idle(process.pid)
    return receiver


def wait_idle(pgid: int, limit_s: float = 120, threshold: float = 0.05) -> None:
    """Wait until the node has finished starting up (e.g. the pipeline thread loading its models).

    `serve` answers C-ECHO at once and loads the pipeline's models in a thread;
    measuring before that is done would charge the start-up to ingest.
    """
    deadline = time.monotonic() + limit_s
    previous = cpu_seconds(pgid) or 0.0
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = cpu_seconds(pgid) or 0.0
        if current - previous < threshold * 0.5:
            return
        previous = current
