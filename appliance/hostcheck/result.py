"""What a check finds, and what the checks are given."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.defaults import API_LISTEN
from appliance.node.config import NodeConfig, load_config

Status = Literal["ok", "warn", "fail"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail")
#: the node daemon's configuration file, as packaging/systemd/appliance.service names it
DEFAULT_CONFIG = Path("/etc/appliance/node.toml")
#: seconds any one network probe may take
PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class Result:
    """One finding: *detail* says what was found, *remedy* what to do (empty when ok)."""

    name: str
    status: Status
    detail: str
    remedy: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "remedy": self.remedy}


def ok(name: str, detail: str) -> Result:
    return Result(name, "ok", detail)


def warn(name: str, detail: str, remedy: str) -> Result:
    return Result(name, "warn", detail, remedy)


def fail(name: str, detail: str, remedy: str) -> Result:
    return Result(name, "fail", detail, remedy)


@dataclass(frozen=True)
class Settings:
    """What to check: the node's configuration as the daemon would read it, where it came
    from, and more disks than the data directory."""

    config: NodeConfig
    config_file: Path | None = None  # None: no file, the daemon's defaults
    listen_configured: bool = True  # False: the file names no API address (default used)
    disks: tuple[Path, ...] = ()
    timeout: float = PROBE_TIMEOUT


def load_settings(config_file: Path | None, data_dir: Path | None,
                  disks: Sequence[Path] = ()) -> Settings:
    """The node's configuration as ``appliance serve --config FILE`` reads it (without a
    file: the defaults, as ``appliance serve`` alone), *data_dir* overriding it. A file
    without ``listen`` (which the daemon refuses) is checked with the default address."""
    listen_configured = config_file is None or names_listen(config_file)
    config = load_config(data_dir, None if listen_configured and config_file else API_LISTEN,
                         config_file)
    return Settings(config, config_file, listen_configured, tuple(disks))


def names_listen(config_file: Path) -> bool:
    """Whether the TOML file sets ``listen`` (True when it cannot be read: load_config then
    says what is wrong with it)."""
    try:
        return "listen" in tomllib.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True


def counts(results: list[Result]) -> dict[Status, int]:
    """How many results have each status."""
    return {status: sum(r.status == status for r in results) for status in STATUSES}
