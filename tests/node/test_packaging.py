"""The shipped daemon configuration parses, and the unit leaves the data path running."""

from __future__ import annotations

import configparser
import tomllib
from pathlib import Path

from appliance.node.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_loads(tmp_path: Path) -> None:
    config = load_config(None, None, ROOT / "packaging" / "node.toml")
    assert config.listen == ("127.0.0.1", 9500)
    assert tomllib.loads((ROOT / "packaging" / "node.toml").read_text())["data_dir"] == \
        str(config.data_dir)


def test_unit_keeps_engines_on_daemon_stop() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "packaging" / "systemd" / "appliance.service")
    assert unit["Service"]["KillMode"] == "process"
    assert "appliance serve --config /etc/appliance/node.toml" in unit["Service"]["ExecStart"]
