"""The README's storescu command, as written there, sends every cohort the project generates
(`dicom-node synth` with either dermoscopy SOP class, `dicom-node convert` as CR or Secondary
Capture) to a running node: storescu exits 0 and every file is stored."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.helpers import need, write_image_manifest

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "/path/to/dicom/folder"


def readme_storescu() -> tuple[dict[str, str], list[str]]:
    """(environment, argv) of the README's storescu line for a folder."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if re.search(r"\bstorescu\b", line) and FOLDER in line]
    assert len(lines) == 1, f"README.md should show one storescu command for {FOLDER}, found {lines}"
    words = shlex.split(lines[0], comments=True)
    env = {}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "storescu" and "11112" in words and FOLDER in words, words
    return env, words


def dicom_node(*args: str) -> None:
    run = subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]


def make_cohort(kind: str, out: Path) -> Path:
    folder = out / "cohort"
    if kind.startswith("synth"):
        derm_sop = kind.split("-")[1]
        modalities = ["all"] if derm_sop == "dms" else ["derm"]
        dicom_node("synth", "--out", str(folder), "--patients", "2", "--visits", "1", "--preset", "small",
                   "--seed", "5", "--jobs", "1", "--derm-sop", derm_sop, "--modalities", *modalities, "--quiet")
    else:
        manifest = write_image_manifest(out / "images", patients=2, per=2)
        dicom_node("convert", "--manifest", str(manifest), "--out", str(folder), "--sop", kind.split("-")[1],
                   "--skip-duplicates", "--quiet")
    assert (folder / "truth.json").is_file()        # not DICOM: the command must leave it alone
    return folder


# Dermoscopic Photography (the SOP class storescu's default list lacks) and a converted image set;
# the other dermoscopy class and Secondary Capture go through the same command path.
@pytest.mark.parametrize("kind", ["synth-dms", "convert-cr"])
def test_the_readme_storescu_command_stores_every_file_of_a_generated_cohort(start_node, tmp_path, kind):
    storescu = need("storescu")
    env, argv = readme_storescu()
    folder = make_cohort(kind, tmp_path)
    files = sorted(folder.rglob("*.dcm"))
    assert files
    node = start_node()
    argv = [storescu if word == "storescu" else str(node.port) if word == "11112" else
            str(folder) if word == FOLDER else word for word in argv]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert run.returncode == 0, f"{shlex.join(argv)}\n{run.stdout[-2000:]}{run.stderr[-2000:]}"

    stored = {path.stem for path in node.storage.rglob("*.dcm")}
    sent = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    assert sent <= stored, f"{len(sent - stored)} of {len(sent)} files not stored:\n{node.log()[-3000:]}"
    classes = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID) for path in files}
    if kind == "synth-dms":
        assert "1.2.840.10008.5.1.4.1.1.77.1.7" in classes      # Dermoscopic Photography: needs -R
