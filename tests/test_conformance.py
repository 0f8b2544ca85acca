"""docs/conformance.md is what the code renders now (`dicom_node.conformance`), so the Conformance
Statement cannot drift from the presentation contexts, statuses and limits the node runs with."""

from __future__ import annotations

from pathlib import Path

from dicom_node.cli import main
from dicom_node.conformance import REGENERATE, render
from dicom_node.config import Settings
from dicom_node.scp import make_ae
from dicom_node.security import BCP195_CIPHERS
from dicom_node.statuses import Status
from tests.helpers import write_toml

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"


def test_docs_conformance_md_is_what_the_code_renders_now():
    assert DOC.read_text(encoding="utf-8") == render(Settings()), (
        f"docs/conformance.md differs from what the code renders: run `{REGENERATE}` and review the diff")


def test_every_supported_sop_class_status_and_cipher_is_in_the_statement():
    text = DOC.read_text(encoding="utf-8")
    contexts = make_ae(Settings()).supported_contexts
    assert len(contexts) > 170
    missing = [str(c.abstract_syntax) for c in contexts if f"`{c.abstract_syntax}`" not in text]
    assert not missing, f"supported but not in docs/conformance.md: {missing}"
    syntaxes = {ts for c in contexts for ts in c.transfer_syntax}
    assert all(f"`{ts}`" in text for ts in syntaxes)
    assert all(f"| 0x{int(status):04X} |" in text for status in Status)
    assert all(f"`{cipher}`" in text for cipher in BCP195_CIPHERS.split(":"))
    assert "Dermoscopic Photography Image Storage" in text and "`ISO_IR 192`" in text


def test_the_command_renders_the_defaults_or_a_site_s_own_settings(tmp_path, capsys):
    assert main(["conformance", "--defaults"]) == 0
    assert capsys.readouterr().out == render(Settings())
    config = write_toml(tmp_path / "site.toml", {"node": {"ae_title": "SITE_PACS", "port": 104,
                                                          "max_associations": 3}})
    out = tmp_path / "statement.md"
    assert main(["--config", str(config), "conformance", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "AE title `SITE_PACS`" in text and "port 104 " in text and "| 3 (`node.max_associations`)" in text
