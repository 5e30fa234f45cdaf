"""What an engine process needs to know, parsed once at each edge: from CLI options in the
launching process, from nbdkit ``key=value`` parameters in the engine process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from appliance.chain.format import MAX_SIZE, check_name
from appliance.defaults import ENGINE_THREADS, ENGINE_THREADS_LOCAL, REPLICA_TIMEOUT
from appliance.errors import InvalidArgument
from appliance.replication.protocol import format_address, parse_address

Address = tuple[str, int]

#: The export a local block device is attached through: as large as a volume may grow, so
#: the device can grow while in use (its size is limited to the volume's by the frontend).
FRONTEND_EXPORT = "frontend"
FRONTEND_SIZE = MAX_SIZE


@dataclass(frozen=True)
class EngineSettings:
    volume: str
    replicas: tuple[Address, ...]
    secret_file: Path
    socket: Path
    control: Path
    listen: Address | None = None
    psk_file: Path | None = None
    salvage: bool = False
    salvage_from: Address | None = None
    timeout: float = REPLICA_TIMEOUT
    rebuild_bandwidth: int = 0
    local_fast_path: bool = False  # serve a replica on this host in the engine's process
    #: nbdkit worker threads per connection (0: the default, fewer with the fast path,
    #: where each request's work runs in the engine's interpreter: docs/performance.md)
    threads: int = 0
    #: the node daemon's API URL and token file, where a clustered volume's witness is
    #: (docs/membership.md, "The witness"); None alone
    witness: str | None = None
    witness_token_file: Path | None = None
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        check_name(self.volume, "volume name")
        if not self.replicas:
            raise InvalidArgument("an engine needs at least one --replica")
        if self.salvage_from is not None and self.salvage_from not in self.replicas:
            raise InvalidArgument(f"--salvage-from {format_address(self.salvage_from)} is not "
                                  "one of the --replica addresses")
        if not 0 < self.timeout <= 3600:
            raise InvalidArgument(f"invalid replica timeout {self.timeout}: 0 < seconds <= 3600")

    @property
    def worker_threads(self) -> int:
        if self.threads:
            return self.threads
        return ENGINE_THREADS_LOCAL if self.local_fast_path else ENGINE_THREADS

    @property
    def log_file(self) -> Path:
        return self.control.with_name(self.control.name + ".log")

    @property
    def start_failure_file(self) -> Path:
        """Where an engine that refused to start leaves its error (code and message)."""
        return self.control.with_name(self.control.name + ".failed")

    @property
    def pid_file(self) -> Path:
        return self.socket.with_name(self.socket.name + ".pid")

    def plugin_parameters(self) -> list[str]:
        """``key=value`` parameters for the plugin (no secret: only the file's path)."""
        parameters = [f"volume={self.volume}", f"secret-file={self.secret_file}",
                      f"socket={self.socket}", f"control={self.control}",
                      f"timeout={self.timeout}", f"rebuild-bandwidth={self.rebuild_bandwidth}"]
        parameters += [f"replica={format_address(address)}" for address in self.replicas]
        if self.listen:
            parameters.append(f"listen={format_address(self.listen)}")
        if self.psk_file:
            parameters.append(f"psk-file={self.psk_file}")
        if self.salvage:
            parameters.append("salvage=1")
        if self.salvage_from:
            parameters.append(f"salvage-from={format_address(self.salvage_from)}")
        if self.local_fast_path:
            parameters.append("local=1")
        if self.witness and self.witness_token_file:
            parameters += [f"witness={self.witness}",
                           f"witness-token-file={self.witness_token_file}"]
        return parameters

    @classmethod
    def from_parameters(cls, pairs: list[tuple[str, str]]) -> EngineSettings:
        values: dict[str, str] = {}
        replicas: list[Address] = []
        for key, value in pairs:
            if key == "replica":
                replicas.append(parse_address(value))
            elif key in _SINGLE:
                values[key] = value
            else:
                raise InvalidArgument(f"unknown engine parameter {key!r}")
        missing = [key for key in ("volume", "secret-file", "socket", "control")
                   if key not in values]
        if missing:
            raise InvalidArgument(f"missing engine parameter(s): {', '.join(missing)}")
        try:
            return cls(
                volume=values["volume"], replicas=tuple(replicas),
                secret_file=Path(values["secret-file"]), socket=Path(values["socket"]),
                control=Path(values["control"]),
                listen=parse_address(values["listen"]) if "listen" in values else None,
                psk_file=Path(values["psk-file"]) if "psk-file" in values else None,
                salvage=values.get("salvage") == "1",
                salvage_from=parse_address(values["salvage-from"])
                if "salvage-from" in values else None,
                timeout=float(values.get("timeout", REPLICA_TIMEOUT)),
                rebuild_bandwidth=int(values.get("rebuild-bandwidth", 0)),
                local_fast_path=values.get("local") == "1",
                witness=values.get("witness"),
                witness_token_file=Path(values["witness-token-file"])
                if "witness-token-file" in values else None)
        except ValueError as exc:
            raise InvalidArgument(f"invalid engine parameter: {exc}") from exc


_SINGLE = {"volume", "secret-file", "socket", "control", "listen", "psk-file", "salvage",
           "salvage-from", "timeout", "rebuild-bandwidth", "local", "witness",
           "witness-token-file"}
