"""``appliance engine ...``: run and drive the engine of one volume (an nbdkit process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from appliance.cli.output import emit_json, table
from appliance.cli.params import ADDRESS, LABEL, output_option
from appliance.defaults import (
    CONTROL_TIMEOUT,
    ENGINE_THREADS,
    ENGINE_THREADS_LOCAL,
    REPLICA_TIMEOUT,
)
from appliance.frontend.attach import attach as attach_device
from appliance.frontend.attach import detach as detach_device
from appliance.nbd.launch import start_engine, stop_engine
from appliance.nbd.settings import EngineSettings
from appliance.replication import engine_control
from appliance.replication.protocol import format_address
from appliance.units import format_size

CONTROL = click.option("--control", "control_path", required=True,
                       type=click.Path(path_type=Path), help="The engine's control socket.")


def attach_state(control_path: Path) -> Path:
    return control_path.with_name(control_path.name + ".attach")


@click.group()
def engine() -> None:
    """Run and control the engine of a volume."""


@engine.command()
@click.argument("name")
@click.option("--replica", "replicas", type=ADDRESS, multiple=True, required=True,
              help="HOST:PORT of a replica server; repeat for each replica.")
@click.option("--secret-file", required=True, type=click.Path(path_type=Path),
              help="File (mode 0600) holding the volume's shared secret.")
@click.option("--socket", "socket_path", required=True, type=click.Path(path_type=Path),
              help="Unix socket to serve NBD on.")
@CONTROL
@click.option("--listen", type=ADDRESS, help="Also serve NBD over TLS-PSK on HOST:PORT.")
@click.option("--psk-file", type=click.Path(path_type=Path),
              help="TLS-PSK key file for --listen (default: created beside the control socket).")
@click.option("--salvage", is_flag=True,
              help="Start even if a member that may hold the newest writes is unreachable: "
                   "serve the best reachable member.")
@click.option("--salvage-from", type=ADDRESS, metavar="HOST:PORT",
              help="Serve the replica at HOST:PORT alone (diverged replicas: the operator's "
                   "choice); replicas that may hold data it lacks are kept, not rebuilt.")
@click.option("--timeout", type=float, default=REPLICA_TIMEOUT, show_default=True,
              help="Seconds before an unresponsive replica is taken out of service.")
@click.option("--rebuild-bandwidth", type=int, default=0,
              help="Rebuild bandwidth limit in bytes per second (0: none).")
@click.option("--threads", type=click.IntRange(1, 64),
              help=f"nbdkit worker threads per NBD connection [default: {ENGINE_THREADS}, "
                   f"{ENGINE_THREADS_LOCAL} with --local-fast-path].")
@click.option("--local-fast-path", is_flag=True,
              help="Serve a replica on this host in the engine's process: its server lends "
                   "it (docs/local-fast-path.md).")
@click.option("--foreground", is_flag=True, help="Run in this process (nbdkit -f).")
def start(name: str, replicas: tuple[tuple[str, int], ...], secret_file: Path,
          socket_path: Path, control_path: Path, listen: tuple[str, int] | None,
          psk_file: Path | None, salvage: bool, salvage_from: tuple[str, int] | None,
          timeout: float, rebuild_bandwidth: int, threads: int | None, local_fast_path: bool,
          foreground: bool) -> None:
    """Start the engine of volume NAME on its replicas."""
    settings = EngineSettings(name, replicas, secret_file, socket_path, control_path,
                              listen=listen, psk_file=psk_file, salvage=salvage,
                              salvage_from=salvage_from, timeout=timeout,
                              rebuild_bandwidth=rebuild_bandwidth, threads=threads or 0,
                              local_fast_path=local_fast_path)
    pid = start_engine(settings, foreground=foreground)
    click.echo(f"engine of {name} serving on {socket_path} (pid {pid})")
    info = engine_control.call(control_path, "status")
    started = info.get("started") or {}
    for label, key in (("rebuilding (behind)", "behind"), ("kept (diverged)", "kept"),
                       ("unreachable", "unreachable")):
        if started.get(key):
            click.echo(f"{label}: {', '.join(started[key])}")
    if started.get("salvaged"):
        click.echo(salvage_line(info["salvage"]))


@engine.command()
@CONTROL
@output_option
def status(control_path: Path, output: str) -> None:
    """Show the volume, its replicas and their modes."""
    info = engine_control.call(control_path, "status")
    if output == "json":
        emit_json(info)
        return
    click.echo(f"volume {info['volume']}  {format_size(info['size'])}  {info['state']}  "
               f"generation {info['generation']}  branch {info['branch'][:8]}  "
               f"socket {info['socket']}")
    if info.get("salvage"):
        click.echo(salvage_line(info["salvage"]))
    rows = [[r["address"], r["mode"], r["replica_id"][:8] or "-", str(r["reads"]),
             str(r["writes"]), _note(r)] for r in info["replicas"]]
    click.echo(table(rows, ["REPLICA", "MODE", "ID", "READS", "WRITES", "NOTE"]))


def salvage_line(salvage: dict[str, Any]) -> str:
    """What a salvage chose and gave up, in one line."""
    given = "; ".join(f"{item.get('replica') or item.get('replica_id')} ({item.get('why')})"
                      for item in salvage.get("given_up") or []) or "nothing known"
    return f"salvaged at {salvage.get('at')} from {salvage.get('from')}; given up: {given}"


def _note(replica: dict[str, Any]) -> str:
    rebuild = replica.get("rebuild")
    if replica["mode"] == "WO" and rebuild:
        total = rebuild.get("total_bytes") or 0
        done = rebuild.get("copied_bytes") or 0
        return f"rebuilding {format_size(done)}/{format_size(total)}"
    return str(replica.get("reason", ""))


@engine.command("add-replica")
@CONTROL
@click.argument("address", type=ADDRESS)
@click.option("--discard", is_flag=True,
              help="Also take a replica whose diverged branch a salvage kept (its data goes).")
def add_replica(control_path: Path, address: tuple[str, int], discard: bool) -> None:
    """Add the replica at ADDRESS (HOST:PORT): it is rebuilt, then serves."""
    engine_control.call(control_path, "add-replica", address=format_address(address),
                 discard=discard)
    click.echo(f"replica {format_address(address)} added; rebuilding")


@engine.command("remove-replica")
@CONTROL
@click.argument("address", type=ADDRESS)
def remove_replica(control_path: Path, address: tuple[str, int]) -> None:
    """Take the replica at ADDRESS out of the volume."""
    engine_control.call(control_path, "remove-replica", address=format_address(address))
    click.echo(f"replica {format_address(address)} removed")


@engine.command()
@CONTROL
@click.argument("name")
@click.option("--label", "labels", type=LABEL, multiple=True, help="KEY=VALUE, repeatable.")
def snapshot(control_path: Path, name: str, labels: tuple[tuple[str, str], ...]) -> None:
    """Snapshot every replica at one point in the stream of writes."""
    engine_control.call(control_path, "snapshot", name=name, labels=dict(labels),
                        timeout=CONTROL_TIMEOUT)
    click.echo(f"snapshot {name} created")


@engine.command()
@CONTROL
def attach(control_path: Path) -> None:
    """Attach the volume as a local block device and print its path."""
    info = engine_control.call(control_path, "status")
    device = attach_device(info["volume"], Path(info["socket"]), attach_state(control_path),
                           int(info["size"]))
    click.echo(device)


@engine.command()
@CONTROL
def detach(control_path: Path) -> None:
    """Detach the volume's local block device."""
    detach_device(attach_state(control_path))


@engine.command()
@CONTROL
def stop(control_path: Path) -> None:
    """Detach if attached, then stop the engine cleanly (every write flushed)."""
    detach_device(attach_state(control_path))
    stop_engine(control_path)
    click.echo("engine stopped")
