"""The daemon's configuration: command-line flags over an optional TOML file, parsed once
into a frozen dataclass that is passed down."""

from __future__ import annotations

import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.defaults import REPLICA_TIMEOUT
from appliance.errors import InvalidArgument, NotFound
from appliance.replication.protocol import format_address, parse_address

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
    # a cluster: the client URLs of its etcd members (empty: one node on SQLite)
    cluster: tuple[str, ...] = ()
    cluster_key_file: Path | None = None  # the cluster's key (docs/cluster.md)
    etcd_ca: Path | None = None  # TLS to etcd: the CA, and this node's certificate and key
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    node_lease_ttl: float = 10.0  # seconds without a heartbeat before a node is down
    # where this node's iSCSI target listens (HOST: the replica address when not given)
    iscsi_portal: Address = ("", 3260)
    share_port_range: tuple[int, int] = (20490, 20989)  # NFS ports of shared volumes

    @property
    def clustered(self) -> bool:
        return bool(self.cluster)

    @property
    def api_address(self) -> str:
        """Where other nodes reach this node's API: the advertised host, the API's port."""
        return format_address((self.replica_address, self.listen[1]))

    @property
    def local_api_url(self) -> str:
        """Where processes on this node (engines) reach this node's API."""
        host = self.listen[0]
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard is not an address
            host = "127.0.0.1"
        return f"http://{format_address((host, self.listen[1]))}"

    @property
    def portal(self) -> Address:
        """This node's iSCSI portal, its host filled in."""
        host, port = self.iscsi_portal
        return (host or self.replica_address, port)

    @property
    def key_file(self) -> Path:
        return self.cluster_key_file or self.data_dir / "cluster.key"

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
         "replica_timeout", "local_fast_path", "cluster", "cluster_key_file", "etcd_ca",
         "etcd_cert", "etcd_key", "node_lease_ttl", "iscsi_portal",
         "share_port_range"}
_NODE_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")


def load_config(data_dir: Path | None, listen: str | None, config_file: Path | None,
                **flags: str | Path | None) -> NodeConfig:
    """Flags override the file; the file overrides the defaults. *flags* are the other
    options of ``appliance serve`` by configuration key (None: not given); ``advertise``
    is the ``replica_address``."""
    values = _read_file(config_file) if config_file is not None else {}
    if flags.get("advertise") is not None:
        flags["replica_address"] = flags.pop("advertise")
    flags.pop("advertise", None)
    values.update({key: value for key, value in flags.items() if value is not None})
    if listen is not None:
        values["listen"] = listen
    if data_dir is not None:
        values["data_dir"] = str(data_dir)
    if "listen" not in values:
        raise InvalidArgument("--listen HOST:PORT is required (or 'listen' in the config file)")
    port_range = _range(values, "port_range", (10100, 10999))
    share_ports = _range(values, "share_port_range", (20490, 20989))
    cluster = _etcd_urls(values.get("cluster", ()))
    try:
        listen_address = parse_address(str(values["listen"]))
        node_name = str(values.get("node_name", socket.gethostname().lower()))
        if (cluster or "node_name" in values) and not _NODE_NAME.fullmatch(node_name):
            raise InvalidArgument(f"invalid node name {node_name!r}: lower-case letters, "
                                  "digits, '.' and '-', at most 63")
        replica_address = str(values.get("replica_address", "")) or (
            listen_address[0] if cluster else "127.0.0.1")
        if cluster and replica_address in ("0.0.0.0", "::", ""):  # noqa: S104 - a check
            raise InvalidArgument("a node of a cluster needs --advertise HOST: the address "
                                  "other nodes reach it at")
        config = NodeConfig(
            data_dir=Path(values.get("data_dir", DEFAULT_DATA_DIR)).resolve(),
            listen=listen_address,
            node_name=node_name,
            replica_address=replica_address,
            port_range=(int(port_range[0]), int(port_range[1])),
            reconcile_interval=float(values.get("reconcile_interval", 2.0)),
            replica_timeout=float(values.get("replica_timeout", REPLICA_TIMEOUT)),
            local_fast_path=_flag(values.get("local_fast_path", True), "local_fast_path"),
            cluster=tuple(cluster),
            cluster_key_file=_path(values.get("cluster_key_file")),
            etcd_ca=_path(values.get("etcd_ca")),
            etcd_cert=_path(values.get("etcd_cert")),
            etcd_key=_path(values.get("etcd_key")),
            node_lease_ttl=float(values.get("node_lease_ttl", 10.0)),
            iscsi_portal=_portal(values.get("iscsi_portal")),
            share_port_range=share_ports)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"invalid configuration: {exc}") from exc
    if not 2 <= config.node_lease_ttl <= 300:
        raise InvalidArgument("node_lease_ttl must be 2 to 300 seconds")
    if (config.etcd_cert is None) != (config.etcd_key is None):
        raise InvalidArgument("etcd_cert and etcd_key go together (the client certificate "
                              "and its key)")
    return config


def _read_file(config_file: Path) -> dict[str, Any]:
    try:
        values = tomllib.loads(config_file.read_text())
    except FileNotFoundError:
        raise NotFound(f"config file {config_file} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config file {config_file}: {exc}") from exc
    unknown = sorted(set(values) - _KEYS)
    if unknown:
        raise InvalidArgument(f"config file {config_file}: unknown key {unknown[0]!r}")
    return values


def _etcd_urls(given: Any) -> tuple[str, ...]:
    """The etcd members' client URLs from ``etcd://A:P,B:P`` (or a TOML list): a scheme
    holds for the members after it until another is given, so that ``etcds://A:P,B:P``
    is TLS to both."""
    if isinstance(given, str):
        parts = given.split(",")
    elif isinstance(given, list | tuple) and all(isinstance(part, str) for part in given):
        parts = list(given)
    else:
        raise InvalidArgument(f"invalid cluster {given!r}: etcd://HOST:PORT[,HOST:PORT...]")
    urls, prefix = [], "http://"
    for part in (part.strip() for part in parts):
        if part:
            url, prefix = _etcd_url(part, prefix)
            urls.append(url)
    return tuple(urls)


def _etcd_url(text: str, default: str) -> tuple[str, str]:
    """``etcd://H:P`` is http, ``etcds://H:P`` https (TLS); plain ``H:P`` takes *default*
    (the scheme before it). Returns the URL and its scheme."""
    for scheme, real in (("etcd://", "http://"), ("etcds://", "https://"),
                         ("http://", "http://"), ("https://", "https://")):
        if text.startswith(scheme):
            text, prefix = text[len(scheme):], real
            break
    else:
        prefix = default
    parse_address(text.rstrip("/"))  # HOST:PORT, or a clear error
    return prefix + text.rstrip("/"), prefix


def _range(values: dict[str, Any], key: str, default: tuple[int, int]) -> tuple[int, int]:
    given = values.get(key, default)
    if not isinstance(given, list | tuple) or len(given) != 2 or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in given) or \
            not 1024 <= given[0] <= given[1] <= 65535:
        raise InvalidArgument(f"invalid {key} {given!r}: [FIRST, LAST], ports 1024-65535")
    return (int(given[0]), int(given[1]))


def _portal(value: Any) -> Address:
    """``HOST:PORT``, or ``:PORT`` for the node's replica address."""
    if value in (None, ""):
        return ("", 3260)
    text = str(value)
    if text.startswith(":"):
        return ("", parse_address("localhost" + text)[1])
    return parse_address(text)


def _path(value: Any) -> Path | None:
    return None if value in (None, "") else Path(str(value)).resolve()


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"invalid {key} {value!r}: true or false")
    return value
