"""Plain helpers for the tests: corpus, ports, configs, a node run as a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pydicom.data
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.config import settings_from_dict
from dicom_node.part10 import split_part10

TEST_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
POSTGRES_ADMIN_URL = os.environ.get("DICOM_NODE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

# One file per transfer syntax family the node must accept, all bundled with pydicom.
CORPUS = {
    "explicit_le": "CT_small.dcm",
    "implicit_le": "MR_small_implicit.dcm",
    "explicit_be": "MR_small_bigendian.dcm",
    "deflate": "image_dfl.dcm",
    "jpeg_baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "jpeg_extended": "JPEG-lossy.dcm",
    "jpeg_lossless": "SC_rgb_jpeg_gdcm.dcm",
    "jpeg_ls": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg2000": "MR_small_jp2klossless.dcm",
    "jpeg2000_lossy": "JPEG2000.dcm",
    "rle": "MR_small_RLE.dcm",
    "rle_multiframe": "SC_rgb_rle_2frame.dcm",
    "us_palette": "examples_palette.dcm",
    "ecg_waveform": "waveform_ecg.dcm",
    "sr": "test-SR.dcm",
}


def corpus_path(name: str) -> Path:
    return TEST_FILES / CORPUS[name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_database() -> str:
    """Create a throw-away database on the local server; skip if none answers."""
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg is not installed")
    admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"dicomnode_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL server answers at {admin}: {error}".splitlines()[0])
    return name


def module_database(kind: str, folder: Path) -> tuple[str, str | None]:
    """(URL, PostgreSQL database name or None) for a module-scoped node: a throw-away
    PostgreSQL database (skips when no server answers), or SQLite under `folder`."""
    if kind == "postgresql":
        database = _postgres_database()
        return f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{database}", database
    return f"sqlite:///{folder / 'node.db'}", None


def _drop_postgres_database(name: str) -> None:
    import psycopg

    admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def node_config(tmp_path: Path, db_url: str | None = None, **sections) -> dict:
    """A node.toml as a dict: a free port, storage under tmp_path, fast series completion."""
    config = {
        # One receiver process (the default is one per core): tests about the network edge see one
        # listener; tests/test_receivers.py and the crash and disk-full tests run two as well.
        "node": {"port": free_port(), "host": "127.0.0.1", "log_level": "INFO", "receivers": 1},
        "database": {"url": db_url or f"sqlite:///{tmp_path / 'node.db'}"},
        "storage": {"dir": str(tmp_path / "storage")},
        "series": {"stable_after_s": 2.0, "check_interval_s": 0.5},
        # Most tests are about the network edge; those about the pipeline switch it on.
        "pipeline": {"enabled": False},
        "security": {"require_known_ae": True,
                     "peers": [{"ae_title": ae, "hosts": ["127.0.0.1"]}
                               for ae in ("STORESCU", "ECHOSCU", "FINDSCU", "PYNETDICOM", "TESTSCU")]},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def write_toml(path: Path, data: dict) -> Path:
    """Tiny TOML writer for test configs (tomllib only reads)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for section, values in data.items():
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        arrays = {k: v for k, v in values.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        lines.append(f"[{section}]")
        for key, v in values.items():
            if key not in tables and key not in arrays:
                lines.append(f"{key} = {value(v)}")
        for key, items in arrays.items():
            for item in items:
                lines.append(f"[[{section}.{key}]]")
                lines += [f"{k} = {value(v)}" for k, v in item.items()]
        for key, table in tables.items():
            lines.append(f"[{section}.{key}]")
            lines += [f"{k} = {value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def echo(port: int, ae_title: str = "ECHOSCU", ssl_context=None, timeout: float = 5) -> bool:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = timeout
    tls_args = (ssl_context, None) if ssl_context else None
    assoc = ae.associate("127.0.0.1", port, ae_title="LINKNODE", tls_args=tls_args)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


@dataclass
class RunningNode:
    """`dicom-node serve` as a subprocess, as a department would run it."""

    config_path: Path
    config: dict
    process: subprocess.Popen | None = None
    log_path: Path = field(default=None)

    @property
    def port(self) -> int:
        return self.config["node"]["port"]

    @property
    def storage(self) -> Path:
        return Path(self.config["storage"]["dir"])

    @property
    def settings(self):
        return settings_from_dict(self.config, base_dir=self.config_path.parent)

    def start(self, wait: bool = True) -> RunningNode:
        self.log_path = self.config_path.with_suffix(".log")
        # Readiness is judged on what this start writes, not on an earlier run's lines.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "--config", str(self.config_path), "serve"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.config_path.parent,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Ready once serve has printed its "listening on" line (printed after the
        socket is bound). No probe connection: it would hold an association slot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log()}")
            # serve's own line, printed last (the receiver pool logs "... listening on" before it)
            if re.search(rf"dicom-node \S+ listening on 127\.0\.0\.1:{self.port}\b", self.log()[self._log_offset:]):
                return
            time.sleep(0.1)
        raise RuntimeError(f"node did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode if self.process else 0


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"DCMTK tool '{tool}' is not installed (apt-get install dcmtk)")
    return path


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, file meta stripped."""
    return split_part10(Path(path).read_bytes())[1]


def write_image_manifest(folder, patients=6, per=3, contrast=1.0, offset=0):
    """A manifest of synthetic chest-like PNG/JPEG images (`patients` x `per`), pixels scaled by `contrast` and
    shifted by `offset` (another "site"), plus one duplicate row that readers skip."""
    import csv

    import numpy as np
    from PIL import Image

    from models.datasets.patients import synthetic_patients
    images, labels = synthetic_patients(patients, per, 48, seed=7)
    (folder / "images").mkdir(parents=True)
    rows = []
    for k, (img, lab) in enumerate(zip(images, labels)):
        name = f"images/{k}.png" if k % 2 else f"images/{k}.jpg"
        Image.fromarray(np.clip(img[0] * contrast + offset, 0, 255).astype(np.uint8)).save(folder / name)
        rows.append({"image": name, "patient_id": lab, "duplicate_of": ""})
    rows.append({"image": "images/0.jpg", "patient_id": labels[0], "duplicate_of": "images/0.jpg"})  # skipped
    with open(folder / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "patient_id", "duplicate_of"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "manifest.csv"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", script)
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module         # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


# the small synthetic cohort of tests/conftest.py's `small_cohort` (and tests/synth's variants of it)
SMALL_COHORT = ["--patients", "8", "--visits", "2", "--seed", "11", "--preset", "small",
                "--error-rate", "0.3", "--twin-rate", "0.3", "--sites", "3"]


def make_cohort(root: Path, name: str, args: list[str]) -> Path:
    """`dicom-node synth` in-process into root/name."""
    from synth.cli import main as synth_main
    out = root / name
    rc = synth_main(["synth", "--out", str(out), "--quiet", *args])
    assert rc == 0, f"synth {' '.join(args)} exited {rc}"
    return out
