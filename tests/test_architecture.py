"""The layout holds: import-linter's contracts (setup.cfg) pass, every module imports, every
benchmark script answers --help, and the README's layout table names folders that exist."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dicom_node", "db", "models", "linkage", "web", "synth")


def _modules() -> list[str]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_import_contracts_hold():
    """Layers (dicom_node > web > linkage > models > db | synth; inside models cli > training >
    evaluation > datasets > inference), the serving path free of training code, and no cycles."""
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--no-cache", "--config", str(ROOT / "setup.cfg")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_import_contracts_would_catch_a_cycle(tmp_path):
    """The contracts are not vacuous: a copy of the tree with one upward import breaks them."""
    import shutil
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("weights", "__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    pipeline = tmp_path / "models" / "inference" / "pipeline.py"
    pipeline.write_text(pipeline.read_text() + "\nfrom models.training import train  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--no-cache", "--config", "setup.cfg"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode != 0
    assert "models.inference.pipeline -> models.training" in run.stdout


@pytest.mark.parametrize("module", _modules())
def test_every_module_imports(module):
    if module == "migrations.env":
        pytest.skip("Alembic's env.py runs only inside `alembic` (db.migrate)")
    importlib.import_module(module)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                                          if "__main__" in p.read_text()))
def test_benchmark_scripts_start(script):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout


def test_readme_layout_table_matches_the_tree():
    """Every folder and file the README's layout table names exists, and every top-level code folder is in it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_cells = [row.split("|")[1] for row in re.findall(r"^\|\s*`[^\n]*", text, re.M)]
    named = {path for cell in first_cells for path in re.findall(r"`([\w.]+/[\w./]*)`", cell)}
    assert named, "README has no layout table (rows starting with | `folder/`)"
    for path in named:
        assert (ROOT / path).exists(), f"README's layout table names {path}, which does not exist"
    tops = {p.name + "/" for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - {"tests/"}
    missing = {top for top in tops if not any(path.startswith(top) for path in named)}
    assert not missing, f"top-level packages not in the README's layout table: {sorted(missing)}"


DOCUMENTS = ["README.md", "models/weights/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def _documented(pattern: str) -> set[str]:
    return {m for doc in DOCUMENTS for m in re.findall(pattern, (ROOT / doc).read_text(encoding="utf-8"))}


def test_documented_commands_exist():
    """Every `dicom-node SUBCOMMAND`, `python -m MODULE` and `benchmarks/SCRIPT.py` the documents name is there."""
    from dicom_node.cli import build_parser
    parser = build_parser()
    subcommands = set(next(a for a in parser._actions if a.dest == "command").choices)  # noqa: SLF001 - argparse has no public list
    named = _documented(r"\bdicom-node ([a-z][a-z-]+)")
    assert named and not named - subcommands, f"documented but not a subcommand: {sorted(named - subcommands)}"
    for script in _documented(r"\bbenchmarks/(\w+\.py)\b"):
        assert (ROOT / "benchmarks" / script).is_file(), f"documents name benchmarks/{script}, which does not exist"


@pytest.mark.parametrize("module", sorted(_documented(r"\bpython -m ([a-z_]+(?:\.[a-z_]+)+)") - {"pytest"}))
def test_documented_python_modules_answer_help(module):
    run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "usage" in run.stdout.lower(), f"python -m {module} --help: {run.stderr[-1500:]}"
