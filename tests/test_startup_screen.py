"""What an operator sees when `dicom-node serve` starts: where to point senders and browsers, how to
create the first account while none exists, and no library loader chatter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import RunningNode, free_port, node_config, write_toml

REPO = Path(__file__).resolve().parents[1]


def test_first_screen_is_clean_and_says_how_to_create_an_account(tmp_path):
    config = node_config(tmp_path, web={"enabled": True, "port": free_port()}, storage={"fsync": False},
                         pipeline={"enabled": True, "workers": 1, "weights_dir": str(REPO / "models" / "weights")})
    config_path = write_toml(tmp_path / "node.toml", config)
    node = RunningNode(config_path, config).start()
    try:
        first = node.log()
    finally:
        assert node.stop() == 0
    assert f"listening on 127.0.0.1:{node.port}" in first
    assert f"web pages on http://127.0.0.1:{config['web']['port']}/" in first
    assert "no web accounts yet" in first and "dicom-node user add NAME --role admin" in first
    # faiss tries its AVX512 and AVX2 builds first and logs each failure at INFO; Alembic names its dialect
    assert "faiss.loader" not in first and "Could not load library" not in first
    assert "alembic.runtime.migration" not in first
    assert "Traceback" not in first

    added = subprocess.run([sys.executable, "-m", "dicom_node", "--config", str(config_path), "user", "add",
                            "ada", "--role", "admin", "--password-stdin"], input="a long enough passphrase 7\n",
                           capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    node.start()
    try:
        second = node.log()[len(first):]
    finally:
        assert node.stop() == 0
    assert f"listening on 127.0.0.1:{node.port}" in second
    assert "no web accounts yet" not in second
