"""The synth CLI: determinism, argument handling, the sub-command contract."""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

from synth.cli import add_subcommands, main


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_worker_count(small_cohort, small_cohort_serial):
    a, b = _digests(small_cohort), _digests(small_cohort_serial)
    assert "truth.json" in a
    assert len(a) > 100
    assert a == b


def test_different_seed_gives_different_images(tmp_path):
    args = ["--patients", "2", "--visits", "1", "--modalities", "cxr", "--preset", "small", "--quiet"]
    assert main(["synth", "--out", str(tmp_path / "a"), "--seed", "1", *args]) == 0
    assert main(["synth", "--out", str(tmp_path / "b"), "--seed", "2", *args]) == 0
    a = [p.read_bytes() for p in sorted((tmp_path / "a").rglob("*.dcm"))]
    b = [p.read_bytes() for p in sorted((tmp_path / "b").rglob("*.dcm"))]
    assert len(a) == len(b) == 2
    assert set(a).isdisjoint(b)


def test_modalities_option_limits_output(tmp_path):
    out = tmp_path / "o"
    assert main(["synth", "--out", str(out), "--patients", "2", "--visits", "1", "--preset", "small",
                 "--modalities", "derm,fundus", "--quiet"]) == 0
    import json
    mods = {s["modality"] for s in json.loads((out / "truth.json").read_text())["studies"]}
    assert mods == {"derm", "fundus"}


def test_bad_arguments_exit_nonzero_with_message(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x"), "--patients", "0"]) == 2
    assert "--patients" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "x"), "--modalities", "pet"]) == 2
    assert "unknown modality" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["synth", "--out", str(busy), "--patients", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "x"


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "synth.cli", "synth", "--out", str(tmp_path / "o"),
                        "--error-rate", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "error-rate" in r.stderr
    assert "Traceback" not in r.stderr


def test_add_subcommands_contract():
    parser = argparse.ArgumentParser(prog="dicom-node")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    assert set(sub.choices) == {"synth", "convert"}
    args = parser.parse_args(["synth", "--out", "d", "--patients", "3", "--seed", "4", "--modalities", "ct", "mr",
                              "--visits", "2", "--error-rate", "0.1"])
    assert callable(args.handler)
    assert (args.patients, args.seed, args.visits, args.error_rate) == (3, 4, 2, 0.1)
    conv = parser.parse_args(["convert", "--manifest", "m.csv", "--out", "d"])
    assert callable(conv.handler) and conv.handler is not args.handler
