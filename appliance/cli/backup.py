"""``appliance backup-target`` and ``appliance backup``: clients of the node's backup API.

Credential and key files are read here, checked for their mode (0600), and their content
sent to the daemon, which keeps them in its own 0600 files; paths on this machine mean
nothing to a daemon elsewhere.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from appliance.backup.format import check_backup_id
from appliance.cli.client import ApiClient, api, client_options
from appliance.cli.node import OUTPUT, Progress, mounted_text, wait_for_copy, wait_options
from appliance.cli.output import emit, table
from appliance.cli.params import LABEL
from appliance.errors import FailedPrecondition, InvalidArgument, Unavailable
from appliance.secrets import read_private_file
from appliance.units import format_size

WAIT_TIMEOUT = 24 * 3600.0


def _backup_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Checked here: an id with '/' or '..' would otherwise change the request's path."""
    if value is None:
        return None
    try:
        return check_backup_id(value)
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc)) from None


@click.group("backup-target")
def backup_target() -> None:
    """Where backups go: file:///PATH, nfs://SERVER/EXPORT/PATH, s3://BUCKET/PREFIX."""


@backup_target.command("set")
@click.argument("target_url", metavar="URL")
@click.option("--credentials", type=click.Path(path_type=Path),
              help="S3 credentials, AWS shared-credentials format, mode 0600.")
@click.option("--encryption-key", type=click.Path(path_type=Path),
              help="32 random bytes (or 64 hex digits), mode 0600: backups are encrypted.")
@client_options
def target_set(target_url: str, credentials: Path | None, encryption_key: Path | None,
               url: str, token_file: Path) -> None:
    """Set the backup target (checked: it must be reachable with these credentials)."""
    body: dict[str, Any] = {"url": target_url}
    if credentials is not None:
        body["credentials"] = read_private_file(credentials, 65536).decode(errors="replace")
    if encryption_key is not None:
        raw = read_private_file(encryption_key, 129)
        if len(raw) != 32:
            text = raw.strip()
            try:
                raw = bytes.fromhex(text.decode())
            except (UnicodeDecodeError, ValueError):
                raise InvalidArgument(f"key file {encryption_key} must hold 32 bytes or 64 "
                                      "hex digits") from None
        if len(raw) != 32:
            raise InvalidArgument(f"key file {encryption_key} must hold 32 bytes or 64 hex "
                                  "digits")
        body["encryption_key"] = raw.hex()
    info = api(url, token_file).call("PUT", "/v1/backup-target", body)
    click.echo(f"backup target set to {info['url']}"
               + (f" (encrypted, key {info['key_id']})" if info["encrypted"] else ""))


@backup_target.command("unset")
@client_options
def target_unset(url: str, token_file: Path) -> None:
    """Forget the backup target, its credentials and key (refused while a backup or a
    restore runs); the backups on it stay there."""
    result = api(url, token_file).call("DELETE", "/v1/backup-target")
    click.echo(f"backup target {result['url']} unset" if result["url"] else
               "no backup target was set")


@backup_target.command("show")
@OUTPUT
@client_options
def target_show(output: str, url: str, token_file: Path) -> None:
    """Show the backup target."""
    emit(api(url, token_file).call("GET", "/v1/backup-target"), output, lambda t: table(
        [[t["url"] or "-", "yes" if t["credentials"] else "no",
          t["key_id"] or "no"]], ["URL", "CREDENTIALS", "ENCRYPTED"]))


@click.group()
def backup() -> None:
    """Backups of volumes: create, list, show, restore, delete, verify."""


def _bytes(value: int | None) -> str:
    return format_size(value) if value is not None else "-"


def _rows(items: list[dict[str, Any]]) -> str:
    """SIZE: the data the backup holds (what a restore writes); NEW: the bytes it stored
    on the target (its new blocks, compressed). The volume's size is ``size`` in JSON."""
    return table([[b["id"], b["volume"], b["snapshot"], b["created"][:19],
                   _bytes(b.get("data_bytes")), _bytes(b.get("uploaded_bytes")), b["state"]]
                  for b in items],
                 ["ID", "VOLUME", "SNAPSHOT", "CREATED", "SIZE", "NEW", "STATE"])


def _wait_backup(client: ApiClient, backup_id: str) -> dict[str, Any]:
    """Poll the backup until it ends; a progress bar on stderr when it is a terminal,
    ending at 100 % when the backup is complete."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    progress = Progress("backing up")
    while True:
        info: dict[str, Any] = client.call("GET", f"/v1/backups/{backup_id}")
        if info["state"] != "in-progress":
            if info["state"] == "complete":
                progress.fraction(1.0)
            progress.end_bar()
            return info
        progress.fraction(info.get("progress") or 0.0)
        if time.monotonic() > deadline:
            raise Unavailable(f"backup {backup_id} did not finish in time")
        time.sleep(0.2)


@backup.command("create")
@click.argument("volume")
@click.option("--snapshot", help="Back up this snapshot (default: one taken now).")
@click.option("--label", "labels", multiple=True, type=LABEL, help="KEY=VALUE; repeatable.")
@click.option("--no-wait", is_flag=True, help="Print the id and return at once.")
@client_options
def backup_create(volume: str, snapshot: str | None, labels: tuple[tuple[str, str], ...],
                  no_wait: bool, url: str, token_file: Path) -> None:
    """Back up VOLUME; print the backup id once it is complete."""
    client = api(url, token_file)
    job = client.call("POST", "/v1/backups", {"volume": volume, "snapshot": snapshot,
                                              "labels": dict(labels)})
    if not no_wait:
        info = _wait_backup(client, job["id"])
        if info["state"] != "complete":
            raise FailedPrecondition(f"backup {job['id']} {info['state']}: "
                                     f"{info.get('error') or ''}")
    click.echo(job["id"])


@backup.command("list")
@click.argument("volume", required=False)
@OUTPUT
@client_options
def backup_list(volume: str | None, output: str, url: str, token_file: Path) -> None:
    """List backups (of VOLUME); damaged items on the target are reported on stderr."""
    query = f"?volume={quote(volume, safe='')}" if volume is not None else ""
    result = api(url, token_file).call("GET", f"/v1/backups{query}")
    for problem in result["problems"]:
        click.echo(f"warning: {problem['object']}: {problem['problem']}", err=True)
    emit(result["backups"], output, _rows)


@backup.command("show")
@click.argument("backup_id", metavar="BACKUP", callback=_backup_id)
@OUTPUT
@client_options
def backup_show(backup_id: str, output: str, url: str, token_file: Path) -> None:
    """Show backup BACKUP."""
    emit(api(url, token_file).call("GET", f"/v1/backups/{backup_id}"), output,
         lambda b: _rows([b]))


@backup.command("restore")
@click.argument("backup_id", metavar="BACKUP", callback=_backup_id)
@click.argument("name")
@click.option("--replicas", type=click.IntRange(1, 8), help="Default: 2.")
@wait_options
@client_options
def backup_restore(backup_id: str, name: str, replicas: int | None, timeout: float,
                   no_wait: bool, url: str, token_file: Path) -> None:
    """Restore BACKUP into a new volume NAME (a restore that fails removes the volume)."""
    client = api(url, token_file)
    client.call("POST", f"/v1/backups/{backup_id}/restore",
                {"name": name, "replicas": replicas})
    if no_wait:
        click.echo(f"volume {name} restoring from {backup_id}")
        return
    wait_for_copy(client, name, "restoring", timeout)
    click.echo(f"volume {name} restored from {backup_id}")


@backup.command("delete")
@click.argument("backup_id", metavar="BACKUP", callback=_backup_id)
@client_options
def backup_delete(backup_id: str, url: str, token_file: Path) -> None:
    """Delete BACKUP (a running one is cancelled) and the blocks only it used."""
    result = api(url, token_file).call("DELETE", f"/v1/backups/{backup_id}")
    click.echo(f"backup {backup_id} {result['status']}")


@backup.command("mount")
@click.argument("backup_id", metavar="BACKUP")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@client_options
def backup_mount(backup_id: str, directory: Path, url: str, token_file: Path) -> None:
    """Mount the file system in backup BACKUP read-only at DIR (an empty directory on the
    node the API runs on); blocks are fetched from the target as files are read."""
    info = api(url, token_file).call("POST", "/v1/mounts", {
        "kind": "backup", "backup": check_backup_id(backup_id),
        "path": str(directory.absolute())})
    click.echo(mounted_text(info))


@backup.command("umount")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@client_options
def backup_umount(directory: Path, url: str, token_file: Path) -> None:
    """Unmount the backup mounted at DIR."""
    api(url, token_file).call("POST", "/v1/mounts/umount", {"path": str(directory.absolute())})
    click.echo(f"{directory.absolute()} unmounted")


@backup.command("verify")
@click.argument("backup_id", metavar="BACKUP", required=False, callback=_backup_id)
@click.option("--volume", help="Verify every backup of this volume.")
@OUTPUT
@client_options
def backup_verify(backup_id: str | None, volume: str | None, output: str, url: str,
                  token_file: Path) -> None:
    """Re-hash every block of BACKUP (or of every backup of --volume); exit 1 if damaged."""
    if (backup_id is None) == (volume is None):
        raise click.UsageError("give a BACKUP or --volume VOLUME")
    client = api(url, token_file)
    result = client.call("POST", f"/v1/backups/{backup_id}/verify") if backup_id else \
        client.call("POST", "/v1/backup-volumes/verify", {"volume": volume})
    emit(result, output, lambda r: "\n".join(
        [f"{len(r['backups'])} backup(s) checked: " + ("ok" if r["ok"] else "DAMAGED")]
        + [f"  {p['object']}: {p['problem']}" for p in r["problems"]]))
    if not result["ok"]:
        sys.exit(1)
