"""The command line as an operator uses it: config errors, db upgrade, import, status, serve."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from db.migrate import head_revision
from tests.helpers import CORPUS, TEST_FILES, corpus_path, node_config, write_toml

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.fixture
def config(tmp_path) -> Path:
    return write_toml(tmp_path / "node.toml", node_config(tmp_path))


def test_shipped_node_toml_is_valid_and_documents_every_setting():
    from dicom_node.config import Settings, load_settings

    settings = load_settings(REPO / "node.toml")
    assert settings.node.port == 11112 and settings.storage.duplicate_policy == "reject"
    text = (REPO / "node.toml").read_text()
    for section, model in Settings.model_fields.items():
        if section == "base_dir":
            continue
        for key in model.annotation.model_fields:
            assert f"\n{key} =" in text or f"[{section}.{key}]" in text or f"[[{section}.{key}]]" in text, \
                f"{section}.{key} is not documented in node.toml"


@pytest.mark.parametrize("toml, key", [
    ("[node]\nprot = 104\n", "node.prot"),
    ("[storage]\nduplicate_policy = \"overwrite\"\n", "storage.duplicate_policy"),
    ("[series]\nstable_after_s = -1\n", "series.stable_after_s"),
    ("[node]\nae_title = \"MUCH_TOO_LONG_AE_TITLE\"\n", "node.ae_title"),
    ("[[security.peers]]\nae_title = \"X\"\nhost = \"1.2.3.4\"\n", "security.peers.0.host"),
])
def test_a_wrong_setting_stops_start_up_naming_the_key(tmp_path, toml, key):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    result = cli("--config", str(path), "serve")
    assert result.returncode == 2
    assert key in result.stderr and "Traceback" not in result.stderr


def test_missing_or_broken_config_file_is_a_clear_error(tmp_path):
    missing = cli("--config", str(tmp_path / "nope.toml"), "status")
    assert missing.returncode == 2 and "not found" in missing.stderr
    (tmp_path / "broken.toml").write_text("[node\nport=1")
    broken = cli("--config", str(tmp_path / "broken.toml"), "status")
    assert broken.returncode == 2 and "not valid TOML" in broken.stderr


def test_db_upgrade_then_import_then_status(config, tmp_path):
    upgrade = cli("--config", str(config), "db", "upgrade")
    assert upgrade.returncode == 0 and f"revision {head_revision()}" in upgrade.stdout

    folder = tmp_path / "incoming"
    folder.mkdir()
    names = ["explicit_le", "jpeg2000_lossy", "rle_multiframe", "deflate"]
    for name in names:
        (folder / CORPUS[name]).write_bytes(corpus_path(name).read_bytes())
    (folder / "notes.txt").write_text("not dicom")
    imported = cli("--config", str(config), "import", str(folder), str(TEST_FILES / "CT_small.dcm"))
    assert imported.returncode == 1  # notes.txt could not be stored; the rest was
    assert "stored 4, already present 1, failed 1" in imported.stdout
    assert "notes.txt: not stored (0xC000)" in imported.stderr

    status = cli("--config", str(config), "status", "--json")
    counts = json.loads(status.stdout)
    assert counts["instances"] == 4 and counts["series"]["receiving"] == 4
    assert counts["bytes"] == sum(p.stat().st_size for p in (tmp_path / "storage").rglob("*.dcm"))
    text = cli("--config", str(config), "status").stdout
    assert "instances  4" in text and "receiving 4" in text


def test_status_on_an_unmigrated_database_says_what_to_do(config):
    result = cli("--config", str(config), "status")
    assert result.returncode == 2 and "dicom-node db upgrade" in result.stderr


def wait_for_stable(config: Path, count: int, timeout: float = 20) -> dict:
    """`status --json` once `count` series are stable, or the last counts at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        counts = json.loads(cli("--config", str(config), "status", "--json").stdout)
        if counts["series"]["stable"] == count or time.monotonic() > deadline:
            return counts
        time.sleep(0.3)


def test_serve_marks_series_stable_and_resumes_after_restart(start_node, tmp_path):
    node = start_node(series={"stable_after_s": 1.0, "check_interval_s": 0.3})
    assert cli("--config", str(node.config_path), "import", str(corpus_path("explicit_le"))).returncode == 0
    counts = wait_for_stable(node.config_path, 1)
    assert counts["series"] == {"receiving": 0, "stable": 1, "processing": 0, "done": 0, "failed": 0}

    # A late instance of the same series re-opens it; a node stopped before the
    # series turns stable again finds it on start-up and finishes the job.
    node.stop()
    late = pydicom.dcmread(corpus_path("explicit_le"))
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.save_as(tmp_path / "late.dcm")
    assert cli("--config", str(node.config_path), "import", str(tmp_path / "late.dcm")).returncode == 0
    counts = json.loads(cli("--config", str(node.config_path), "status", "--json").stdout)
    assert counts["series"]["receiving"] == 1 and counts["instances"] == 2
    time.sleep(1.2)
    node.start()
    counts = wait_for_stable(node.config_path, 1)
    assert counts["series"]["stable"] == 1 and counts["series"]["receiving"] == 0
