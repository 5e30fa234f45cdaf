"""``appliance serve`` and the client commands of a node: disks, volumes, settings."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from appliance.cli.client import ApiClient, RemoteNotFound, api, client_options
from appliance.cli.output import emit, table
from appliance.cli.params import LABEL, SIZE
from appliance.errors import FailedPrecondition, Unavailable
from appliance.units import format_size

OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]),
                      default="table", show_default=True, help="Output format.")
WAIT_TIMEOUT = 300.0


@click.command()
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="State, token, runtime files and the default disk "
                   "(default /var/lib/appliance).")
@click.option("--listen", help="HOST:PORT for the API (default 127.0.0.1:9500).")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="A TOML file; flags override it.")
def serve(data_dir: Path | None, listen: str | None, config_file: Path | None) -> None:
    """Run the node daemon."""
    from appliance.node.config import load_config  # noqa: PLC0415 - trio only when serving
    from appliance.node.daemon import main  # noqa: PLC0415

    if listen is None and config_file is None:
        listen = "127.0.0.1:9500"
    main(load_config(data_dir, listen, config_file))


# -- disks ----------------------------------------------------------------------------------


@click.group()
def disk() -> None:
    """Disks that hold replicas."""


@disk.command("add")
@click.argument("path")
@click.option("--tag", "tags", multiple=True, help="A tag; repeat for more.")
@client_options
def disk_add(path: str, tags: tuple[str, ...], url: str, token_file: Path) -> None:
    """Add the directory PATH (on its own filesystem, ideally) as a disk."""
    info = api(url, token_file).call("POST", "/v1/disks", {"path": path, "tags": list(tags)})
    click.echo(f"disk {info['name']} added ({format_size(info['capacity'])})")


@disk.command("list")
@OUTPUT
@client_options
def disk_list(output: str, url: str, token_file: Path) -> None:
    """List the disks with their capacity and use."""
    disks = api(url, token_file).call("GET", "/v1/disks")
    emit(disks, output, lambda items: table(
        [[d["name"], d["path"], format_size(d["capacity"]), format_size(d["available"]),
          format_size(d["scheduled"]), ",".join(d["tags"]) or "-", str(len(d["replicas"]))]
         for d in items], ["NAME", "PATH", "CAPACITY", "AVAILABLE", "SCHEDULED", "TAGS",
                           "REPLICAS"]))


# -- volumes --------------------------------------------------------------------------------


@click.group()
def volume() -> None:
    """Volumes: create, list, show, attach, detach, expand, clone, delete."""


def _volume_rows(items: list[dict[str, Any]]) -> str:
    return table([[v["name"], format_size(v["size"]), str(v["replicas"]), v["state"],
                   v["robustness"], v["device"] or "-"] for v in items],
                 ["NAME", "SIZE", "REPLICAS", "STATE", "ROBUSTNESS", "DEVICE"])


def _wait(client: ApiClient, name: str, done: Any, what: str) -> dict[str, Any] | None:
    """Poll volume *name* until done(volume) (None when it is gone); progress on stderr."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    shown = said = ""
    while True:
        try:
            info: dict[str, Any] | None = client.call("GET", f"/v1/volumes/{name}")
        except RemoteNotFound:
            info = None  # gone: what delete waits for
        if done(info):
            return info
        state = info["state"] if info else "gone"
        if state != shown and sys.stderr.isatty():
            click.echo(f"{what}: {state}...", err=True)
            shown = state
        progress = info.get("progress") if info else None
        if progress and progress["total_bytes"] and sys.stderr.isatty():
            done = progress["done_bytes"] / progress["total_bytes"]
            bar = "#" * int(done * 40)
            click.echo(f"\r{what}: [{bar:<40}] {done:4.0%}", err=True, nl=False)
        if info and info.get("message") and info["message"] != said:
            said = info["message"]
            click.echo(f"{what}: {said}", err=True)
        if time.monotonic() > deadline:
            raise Unavailable(f"volume {name} did not finish ({what}) in {WAIT_TIMEOUT:.0f} s; "
                              f"it is {state}")
        time.sleep(0.2)


@volume.command("create")
@click.argument("name")
@click.option("--size", required=True, type=SIZE, help="Size, e.g. 10G.")
@click.option("--replicas", type=click.IntRange(1, 8), default=2, show_default=True)
@click.option("--disk-tag", "disk_tags", multiple=True, help="Place replicas on disks with it.")
@client_options
def volume_create(name: str, size: int, replicas: int, disk_tags: tuple[str, ...], url: str,
                  token_file: Path) -> None:
    """Create volume NAME."""
    client = api(url, token_file)
    client.call("POST", "/v1/volumes", {"name": name, "size": size, "replicas": replicas,
                                        "disk_tags": list(disk_tags)})
    _wait(client, name, lambda v: v and v["state"] != "creating", "creating")
    click.echo(f"volume {name} created ({format_size(size)}, {replicas} replicas)")


@volume.command("list")
@OUTPUT
@client_options
def volume_list(output: str, url: str, token_file: Path) -> None:
    """List volumes."""
    emit(api(url, token_file).call("GET", "/v1/volumes"), output, _volume_rows)


@volume.command("show")
@click.argument("name")
@OUTPUT
@client_options
def volume_show(name: str, output: str, url: str, token_file: Path) -> None:
    """Show volume NAME."""
    emit(api(url, token_file).call("GET", f"/v1/volumes/{name}"), output,
         lambda v: _volume_rows([v]))


@volume.command("attach")
@click.argument("name")
@client_options
def volume_attach(name: str, url: str, token_file: Path) -> None:
    """Attach volume NAME as a block device on this node; print the device."""
    client = api(url, token_file)
    client.call("POST", f"/v1/volumes/{name}/attach")
    info = _wait(client, name, lambda v: v and v["state"] == "attached" and v["device"],
                 "attaching")
    assert info is not None
    click.echo(info["device"])


@volume.command("detach")
@click.argument("name")
@client_options
def volume_detach(name: str, url: str, token_file: Path) -> None:
    """Detach volume NAME."""
    client = api(url, token_file)
    client.call("POST", f"/v1/volumes/{name}/detach")
    _wait(client, name, lambda v: v and v["state"] == "detached", "detaching")
    click.echo(f"volume {name} detached")


@volume.command("delete")
@click.argument("name")
@client_options
def volume_delete(name: str, url: str, token_file: Path) -> None:
    """Delete volume NAME and its data."""
    client = api(url, token_file)
    client.call("DELETE", f"/v1/volumes/{name}")
    _wait(client, name, lambda v: v is None, "deleting")
    click.echo(f"volume {name} deleted")


@volume.command("expand")
@click.argument("name")
@click.option("--size", required=True, type=SIZE, help="The new size, e.g. 20G.")
@click.option("--resize-fs", is_flag=True,
              help="Grow the ext4 or xfs file system on the attached (unmounted) device too.")
@client_options
def volume_expand(name: str, size: int, resize_fs: bool, url: str, token_file: Path) -> None:
    """Grow volume NAME to SIZE (attached or detached)."""
    info = api(url, token_file).call("POST", f"/v1/volumes/{name}/expand",
                                     {"size": size, "resize_fs": resize_fs})
    click.echo(f"volume {name} expanded to {format_size(info['size'])}")


@volume.command("clone")
@click.argument("source")
@click.argument("name")
@click.option("--snapshot", help="The snapshot to clone (default: one taken now).")
@click.option("--replicas", type=click.IntRange(1, 8), help="Default: as the source.")
@client_options
def volume_clone(source: str, name: str, snapshot: str | None, replicas: int | None, url: str,
                 token_file: Path) -> None:
    """Create volume NAME holding a snapshot of volume SOURCE."""
    client = api(url, token_file)
    client.call("POST", f"/v1/volumes/{source}/clone",
                {"name": name, "snapshot": snapshot, "replicas": replicas})
    info = _wait(client, name, lambda v: v and v["state"] not in ("creating",), "cloning")
    assert info is not None
    if info["state"] == "failed":
        raise FailedPrecondition(info["message"] or f"the clone {name} failed")
    click.echo(f"volume {name} cloned from {source}")


# -- snapshots ------------------------------------------------------------------------------


@click.group()
def snapshot() -> None:
    """Snapshots of a volume: create, list, revert, delete, purge."""


@snapshot.command("create")
@click.argument("volume_name", metavar="VOLUME")
@click.argument("name")
@click.option("--label", "labels", multiple=True, type=LABEL, help="KEY=VALUE; repeatable.")
@client_options
def snapshot_create(volume_name: str, name: str, labels: tuple[tuple[str, str], ...], url: str,
                    token_file: Path) -> None:
    """Take snapshot NAME of VOLUME (attached: every replica at the same point)."""
    api(url, token_file).call("POST", f"/v1/volumes/{volume_name}/snapshots",
                              {"name": name, "labels": dict(labels)})
    click.echo(f"snapshot {name} of volume {volume_name} created")


@snapshot.command("list")
@click.argument("volume_name", metavar="VOLUME")
@OUTPUT
@client_options
def snapshot_list(volume_name: str, output: str, url: str, token_file: Path) -> None:
    """List the snapshots of VOLUME, oldest first."""
    emit(api(url, token_file).call("GET", f"/v1/volumes/{volume_name}/snapshots"), output,
         lambda items: table([[s["name"], s["parent"] or "-", s["created"] or "-",
                               format_size(s["actual_size"]),
                               "removed" if s["removed"] else "-"] for s in items],
                             ["NAME", "PARENT", "CREATED", "ACTUAL SIZE", "STATE"]))


@snapshot.command("revert")
@click.argument("volume_name", metavar="VOLUME")
@click.argument("name")
@client_options
def snapshot_revert(volume_name: str, name: str, url: str, token_file: Path) -> None:
    """Revert the detached VOLUME to snapshot NAME (later writes are discarded)."""
    api(url, token_file).call("POST", f"/v1/volumes/{volume_name}/snapshots/{name}/revert")
    click.echo(f"volume {volume_name} reverted to snapshot {name}")


@snapshot.command("delete")
@click.argument("volume_name", metavar="VOLUME")
@click.argument("name")
@client_options
def snapshot_delete(volume_name: str, name: str, url: str, token_file: Path) -> None:
    """Remove snapshot NAME of VOLUME ('snapshot purge' reclaims its space)."""
    api(url, token_file).call("DELETE", f"/v1/volumes/{volume_name}/snapshots/{name}")
    click.echo(f"snapshot {name} of volume {volume_name} removed")


@snapshot.command("purge")
@click.argument("volume_name", metavar="VOLUME")
@client_options
def snapshot_purge(volume_name: str, url: str, token_file: Path) -> None:
    """Reclaim the space of VOLUME's removed snapshots (online)."""
    api(url, token_file).call("POST", f"/v1/volumes/{volume_name}/purge")
    click.echo(f"snapshots of volume {volume_name} purged")
