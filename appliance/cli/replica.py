"""``appliance replica ...``: offline tools that work on a replica directory directly.

They are for operators (inspection, repair, moving data in and out) and for acceptance
checks; a replica served by a running replica server is locked and refused here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from appliance.chain import LayerInfo, Replica
from appliance.chain.check import check
from appliance.chain.format import FORMAT_NAME, FORMAT_VERSION
from appliance.chain.image import export_image, import_image
from appliance.cli.output import emit_json, table
from appliance.cli.params import ADDRESS, LABEL, SIZE, output_option
from appliance.nbd.launch import replica_server_files, start_replica_server
from appliance.replication.protocol import format_address
from appliance.replication.server_process import serve_forever
from appliance.secrets import read_secret_file
from appliance.units import format_size

DIR = click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))


@click.group()
def replica() -> None:
    """Offline tools for replica directories."""


@contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal."""
    if not sys.stderr.isatty() or total <= 0:
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


@replica.command()
@DIR
@click.option("--size", required=True, type=SIZE, help="Volume size, e.g. 10G.")
def create(directory: Path, size: int) -> None:
    """Create an empty replica of SIZE bytes in DIR (new or empty)."""
    with Replica.create(directory, size) as opened:
        click.echo(f"created replica {directory} ({format_size(size)}, id {opened.replica_id})")


@replica.command("import")
@DIR
@click.argument("source", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--offset", type=SIZE, default=0, show_default=True,
              help="Byte offset in the volume at which INPUT is written.")
def import_(directory: Path, source: Path, offset: int) -> None:
    """Write the raw image INPUT into the head of DIR at --offset."""
    with Replica.open(directory) as opened:
        total = source.stat().st_size if source.is_file() else 0
        with _progress("importing", total) as progress:
            size = import_image(opened, source, offset, progress)
    click.echo(f"imported {format_size(size)} into {directory} at offset {offset}")


@replica.command()
@DIR
@click.argument("destination", metavar="OUTPUT")
@click.option("--snapshot", "snapshot", metavar="NAME", help="Export this snapshot, not the head.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def export(directory: Path, destination: str, snapshot: str | None, force: bool) -> None:
    """Write the head (or a snapshot) of DIR as a sparse raw image to OUTPUT ('-' for stdout)."""
    with Replica.open(directory, writable=False) as opened, \
            _progress("exporting", opened.size if destination != "-" else 0) as progress:
        export_image(opened, destination, snapshot=snapshot, force=force, progress=progress)


@replica.command()
@DIR
@click.argument("name")
@click.option("--label", "labels", type=LABEL, multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--no-checksum", is_flag=True, help="Do not compute the snapshot's checksum now.")
def snapshot(directory: Path, name: str, labels: tuple[tuple[str, str], ...],
             no_checksum: bool) -> None:
    """Freeze the head of DIR as snapshot NAME."""
    with Replica.open(directory) as opened:
        opened.snapshot(name, labels=dict(labels))
        if not no_checksum:
            opened.compute_checksum(name)
    click.echo(f"snapshot {name} created")


@replica.command()
@DIR
@click.argument("name")
def revert(directory: Path, name: str) -> None:
    """Discard the head of DIR and continue from snapshot NAME."""
    with Replica.open(directory) as opened:
        opened.revert(name)
    click.echo(f"reverted to snapshot {name}")


@replica.command("rm")
@DIR
@click.argument("name")
def remove(directory: Path, name: str) -> None:
    """Mark snapshot NAME removed (purge reclaims its space)."""
    with Replica.open(directory) as opened:
        opened.remove_snapshot(name)
    click.echo(f"snapshot {name} marked removed")


@replica.command()
@DIR
def purge(directory: Path) -> None:
    """Reclaim the space of removed snapshots."""
    with Replica.open(directory) as opened:
        stats = opened.purge()
        # Merged layers lose their checksum (their files changed); compute the new ones.
        for layer in opened.layers():
            if layer.name and not layer.removed and layer.checksum is None:
                opened.compute_checksum(layer.name)
    click.echo(f"purged: {stats['deleted'] + stats['coalesced']} layers merged or deleted, "
               f"{format_size(stats['copied_bytes'])} copied, "
               f"{format_size(stats['punched_bytes'])} released")


@replica.command()
@DIR
@click.option("--size", required=True, type=SIZE, help="New volume size (grow only).")
def expand(directory: Path, size: int) -> None:
    """Grow the volume in DIR to SIZE."""
    with Replica.open(directory) as opened:
        opened.expand(size)
    click.echo(f"expanded {directory} to {format_size(size)}")


@replica.command()
@DIR
@output_option
def inspect(directory: Path, output: str) -> None:
    """Show the chain of DIR: snapshots as a tree, sizes, allocation, counters."""
    with Replica.open(directory, writable=False) as opened:
        layers = opened.layers()
        info: dict[str, Any] = {
            "path": str(directory), "replica_id": opened.replica_id, "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION, "size": opened.size,
            "block_size": opened.meta.block_size, "revision": opened.revision,
            "generation": opened.generation, "purge_pending": opened.meta.pending is not None,
            "layers": [layer.as_dict() for layer in layers]}
    if output == "json":
        emit_json(info)
        return
    click.echo(table([
        ["replica", str(directory)], ["id", info["replica_id"]],
        ["format", f"{FORMAT_NAME} version {FORMAT_VERSION}"],
        ["size", f"{format_size(opened.size)} ({opened.size} bytes)"],
        ["revision", str(info["revision"])], ["generation", str(info["generation"])],
    ], ["", ""]).lstrip())
    click.echo()
    click.echo(table(_tree_rows(layers),
                     ["LAYER", "SIZE", "ALLOCATED", "CREATED", "FLAGS", "LABELS"]))


def _tree_rows(layers: list[LayerInfo]) -> list[list[str]]:
    depth: dict[str | None, int] = {}
    rows = []
    for layer in layers:
        level = depth.get(layer.parent, -1) + 1 if layer.parent else 0
        if layer.name is not None:
            depth[layer.name] = level
        flags = [flag for flag, on in (("removed", layer.removed),
                                       ("system", not layer.user_created and not layer.is_head),
                                       ("checksummed", layer.checksum is not None)) if on]
        rows.append([
            "  " * level + ("(head)" if layer.is_head else str(layer.name)),
            format_size(layer.size), format_size(layer.allocated), layer.created or "-",
            ",".join(flags) or "-",
            ",".join(f"{k}={v}" for k, v in sorted(layer.labels.items())) or "-"])
    return rows


@replica.command("check")
@DIR
@output_option
@click.pass_context
def check_(ctx: click.Context, directory: Path, output: str) -> None:
    """Verify the metadata, layer files and snapshot checksums of DIR.

    Exits with status 1 when anything is damaged.
    """
    report = check(directory)
    if output == "json":
        emit_json(report.as_dict())
    else:
        verdict = "OK" if report.ok else "DAMAGED"
        click.echo(f"replica {directory}: {verdict} "
                   f"({len(report.verified)} snapshot checksums verified)")
        for problem in report.problems:
            click.echo(f"  problem: {problem}")
        for note in report.notes:
            click.echo(f"  note: {note}")
    if not report.ok:
        ctx.exit(1)


@replica.command()
@DIR
@click.option("--listen", required=True, type=ADDRESS, help="HOST:PORT to serve on.")
@click.option("--secret-file", required=True, type=click.Path(path_type=Path),
              help="File (mode 0600) holding the volume's shared secret.")
@click.option("--foreground", is_flag=True, help="Serve in this process until SIGTERM.")
def serve(directory: Path, listen: tuple[str, int], secret_file: Path, foreground: bool) -> None:
    """Serve the replica in DIR over the replica protocol.

    Without --foreground it starts in the background, in its own session, returns once it
    answers, and records its pid in DIR/server.pid (its log: DIR/server.log).
    """
    if foreground:
        serve_forever(directory, listen, read_secret_file(secret_file),
                      pid_file=replica_server_files(directory)[0])
        return
    pid = start_replica_server(directory, listen, secret_file)
    click.echo(f"serving {directory} on {format_address(listen)} (pid {pid})")
