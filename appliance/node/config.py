"""The daemon's configuration: command-line flags over an optional TOML file, parsed once
into a frozen dataclass that is passed down."""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.defaults import REPLICA_TIMEOUT
from appliance.errors import InvalidArgument, NotFound
from appliance.replication.protocol import parse_address

Address = tuple[str, int]


@dataclass(frozen=True)
class NodeConfig:
    data_dir: Path
    listen: Address
    node_name: str
    replica_address: str = "127.0.0.1"  # where replica servers listen (this node's address)
    port_range: tuple[int, int] = (10100, 10999)  # replica server ports
    reconcile_interval: float = 2.0  # seconds between looks at running processes
    replica_timeout: float = REPLICA_TIMEOUT
    local_fast_path: bool = True  # engines serve a replica on this node in-process

    @property
    def replica_ports(self) -> range:
        """The ports replica servers may get: ``port_range`` is first and last, inclusive."""
        return range(self.port_range[0], self.port_range[1] + 1)

    @property
    def state_db(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def token_file(self) -> Path:
        return self.data_dir / "token"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def default_disk(self) -> Path:
        return self.data_dir / "disks" / "default"


DEFAULT_DATA_DIR = Path("/var/lib/appliance")
_KEYS = {"data_dir", "listen", "node_name", "replica_address", "port_range", "reconcile_interval",
         "replica_timeout", "local_fast_path"}


def load_config(data_dir: Path | None, listen: str | None,
                config_file: Path | None) -> NodeConfig:
    """Flags override the file; the file overrides the defaults."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = tomllib.loads(config_file.read_text())
        except FileNotFoundError:
            raise NotFound(f"config file {config_file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"config file {config_file}: {exc}") from exc
        unknown = sorted(set(values) - _KEYS)
        if unknown:
            raise InvalidArgument(f"config file {config_file}: unknown key {unknown[0]!r}")
    if listen is not None:
        values["listen"] = listen
    if data_dir is not None:
        values["data_dir"] = str(data_dir)
    if "listen" not in values:
        raise InvalidArgument("--listen HOST:PORT is required (or 'listen' in the config file)")
    port_range = tuple(values.get("port_range", (10100, 10999)))
    if len(port_range) != 2 or not 1024 <= port_range[0] <= port_range[1] <= 65535:
        raise InvalidArgument(f"invalid port_range {values.get('port_range')!r}")
    try:
        return NodeConfig(
            data_dir=Path(values.get("data_dir", DEFAULT_DATA_DIR)).resolve(),
            listen=parse_address(str(values["listen"])),
            node_name=str(values.get("node_name", socket.gethostname())),
            replica_address=str(values.get("replica_address", "127.0.0.1")),
            port_range=(int(port_range[0]), int(port_range[1])),
            reconcile_interval=float(values.get("reconcile_interval", 2.0)),
            replica_timeout=float(values.get("replica_timeout", REPLICA_TIMEOUT)),
            local_fast_path=_flag(values.get("local_fast_path", True), "local_fast_path"))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"invalid configuration: {exc}") from exc


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"invalid {key} {value!r}: true or false")
    return value
