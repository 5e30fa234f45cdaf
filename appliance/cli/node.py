"""``appliance serve`` and the client commands of a node: disks, volumes, settings."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from appliance import apiclient
from appliance.cli.client import ApiClient, api, client_options
from appliance.cli.jobs import volume_jobs
from appliance.cli.output import emit, table
from appliance.cli.params import LABEL, SIZE
from appliance.defaults import API_LISTEN
from appliance.errors import FailedPrecondition, InvalidArgument, Unavailable
from appliance.secrets import read_private_file, write_secret_file
from appliance.units import format_size, format_size_exact

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
@click.option("--cluster", metavar="etcd://H:P[,H:P...]",
              help="Join the cluster whose state is in these etcd members (etcds:// for "
                   "TLS); without it, one node with its state in SQLite.")
@click.option("--node-name", help="This node's name in the cluster (default: the host name).")
@click.option("--advertise", metavar="HOST",
              help="The address other nodes reach this node at (replica servers listen "
                   "there; default: the --listen host).")
@click.option("--cluster-key-file", type=click.Path(path_type=Path),
              help="The cluster's key (0600): made by the first node of a new cluster, "
                   "copied to every other node (default DATA_DIR/cluster.key).")
@click.option("--etcd-ca", type=click.Path(path_type=Path), help="CA file of etcd's TLS.")
@click.option("--etcd-cert", type=click.Path(path_type=Path),
              help="Client certificate for etcd (with --etcd-key).")
@click.option("--etcd-key", type=click.Path(path_type=Path),
              help="Key of the client certificate for etcd.")
def serve(data_dir: Path | None, listen: str | None, config_file: Path | None,
          cluster: str | None, node_name: str | None, advertise: str | None,
          cluster_key_file: Path | None, etcd_ca: Path | None, etcd_cert: Path | None,
          etcd_key: Path | None) -> None:
    """Run the node daemon."""
    from appliance.node.config import load_config  # noqa: PLC0415 - trio only when serving
    from appliance.node.daemon import main  # noqa: PLC0415

    if listen is None and config_file is None:
        listen = API_LISTEN
    main(load_config(data_dir, listen, config_file, cluster=cluster, node_name=node_name,
                     advertise=advertise, cluster_key_file=cluster_key_file,
                     etcd_ca=etcd_ca, etcd_cert=etcd_cert, etcd_key=etcd_key))


# -- disks ----------------------------------------------------------------------------------


@click.group()
def disk() -> None:
    """Disks that hold replicas."""


@disk.command("add")
@click.argument("path")
@click.option("--tag", "tags", multiple=True, help="A tag; repeat for more.")
@click.option("--node", help="The node the directory is on (default: the node the API runs "
                             "on).")
@client_options
def disk_add(path: str, tags: tuple[str, ...], node: str | None, url: str,
             token_file: Path) -> None:
    """Add the directory PATH (on its own filesystem, ideally) as a disk."""
    body: dict[str, Any] = {"path": path, "tags": list(tags)}
    if node:
        body["node"] = node
    info = api(url, token_file).call("POST", "/v1/disks", body)
    click.echo(f"disk {info['name']} added ({format_size(info['capacity'])})")


@disk.command("list")
@OUTPUT
@client_options
def disk_list(output: str, url: str, token_file: Path) -> None:
    """List the disks with their capacity and use."""
    disks = api(url, token_file).call("GET", "/v1/disks")
    emit(disks, output, _disk_table)


def _disk_table(disks: list[dict[str, Any]]) -> str:
    nodes = any(d.get("node") for d in disks)  # a cluster: which node each is on
    return table(
        [[d["name"], *([d["node"]] if nodes else []), d["path"], format_size(d["capacity"]),
          format_size(d["available"]), format_size(d["scheduled"]),
          format_size(d["storage_reserved"]),
          "evicting" if d["eviction_requested"] else "on" if d["allow_scheduling"] else "off",
          ",".join(d["tags"]) or "-",
          str(len(d["replicas"]))]
         for d in disks], ["NAME", *(["NODE"] if nodes else []), "PATH", "CAPACITY",
                           "AVAILABLE", "SCHEDULED", "RESERVED", "SCHEDULING", "TAGS",
                           "REPLICAS"])


@disk.command("update")
@click.argument("name")
@click.option("--tag", "tags", multiple=True,
              help="Replace the disk's tags with these; repeat for more.")
@click.option("--clear-tags", is_flag=True, help="Remove every tag.")
@click.option("--scheduling/--no-scheduling", default=None,
              help="Whether new replicas may be placed on it (those on it stay).")
@click.option("--reserved", type=SIZE, help="Space kept free for other uses, e.g. 10G.")
@click.option("--evict/--no-evict", default=None,
              help="Move its replicas to other disks (rebuilt online for attached volumes, "
                   "copied for detached ones); it takes no new replica meanwhile.")
@client_options
def disk_update(name: str, tags: tuple[str, ...], clear_tags: bool, scheduling: bool | None,
                reserved: int | None, evict: bool | None, url: str, token_file: Path) -> None:
    """Change disk NAME's tags, scheduling or reserved space."""
    if tags and clear_tags:
        raise click.UsageError("give --tag or --clear-tags, not both")
    body: dict[str, Any] = {}
    if tags or clear_tags:
        body["tags"] = list(tags)
    if scheduling is not None:
        body["allow_scheduling"] = scheduling
    if reserved is not None:
        body["storage_reserved"] = reserved
    if evict is not None:
        body["eviction_requested"] = evict
    if not body:
        raise click.UsageError("nothing to change: give --tag, --clear-tags, --scheduling, "
                               "--no-scheduling, --reserved, --evict or --no-evict")
    info = api(url, token_file).call("PATCH", f"/v1/disks/{quote(name, safe='')}", body)
    click.echo(f"disk {name}: tags {','.join(info['tags']) or '-'}, scheduling "
               f"{'on' if info['allow_scheduling'] else 'off'}, reserved "
               f"{format_size(info['storage_reserved'])}"
               + (f", evicting {len(info['replicas'])} replica(s)"
                  if info["eviction_requested"] else ""))


@disk.command("remove")
@click.argument("name")
@client_options
def disk_remove(name: str, url: str, token_file: Path) -> None:
    """Stop using disk NAME (refused while it holds replicas; its directory stays)."""
    api(url, token_file).call("DELETE", f"/v1/disks/{quote(name, safe='')}")
    click.echo(f"disk {name} removed")


# -- volumes --------------------------------------------------------------------------------


@click.group()
def volume() -> None:
    """Volumes: create, list, show, attach, detach, expand, clone, delete."""


def _volume_rows(items: list[dict[str, Any]]) -> str:
    return table([[v["name"], format_size(v["size"]), str(v["replicas"]), v["state"],
                   v["robustness"], v["device"] or "-"] for v in items],
                 ["NAME", "SIZE", "REPLICAS", "STATE", "ROBUSTNESS", "DEVICE"])


# Error codes (errors.py) of a reconcile pass that another pass will not cure by itself:
# waiting on stops with the error (the daemon keeps trying; the operator has to act).


def wait_options(function: Any) -> Any:
    """``--timeout SECONDS`` and ``--no-wait`` (parameters ``timeout`` and ``no_wait``)."""
    function = click.option("--no-wait", is_flag=True,
                            help="Return once the daemon has the request.")(function)
    return click.option("--timeout", type=click.FloatRange(min=0), default=WAIT_TIMEOUT,
                        show_default=True, metavar="SECONDS",
                        help="Give up waiting after this long (the daemon goes on)."
                        )(function)


class Progress(apiclient.VolumeObserver):
    """What a wait shows at a terminal: the state, and a bar for copies."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.tty = sys.stderr.isatty()
        self.shown = ""
        self.bar = False

    def state(self, state: str) -> None:
        if state != self.shown and self.tty:
            self.end_bar()
            click.echo(f"{self.what}: {state}...", err=True)
            self.shown = state

    def fraction(self, fraction: float) -> None:
        if self.tty:
            fraction = min(max(fraction, 0.0), 1.0)
            click.echo(f"\r{self.what}: [{'#' * int(fraction * 40):<40}] {fraction:4.0%}",
                       err=True, nl=False)
            self.bar = True

    def say(self, text: str) -> None:
        self.end_bar()
        click.echo(f"{self.what}: {text}", err=True)

    def end_bar(self, complete: bool = False) -> None:
        if self.bar:
            if complete:
                self.fraction(1.0)
            click.echo("", err=True)
            self.bar = False

    def end(self, complete: bool) -> None:
        self.end_bar(complete)


def wait_for_volume(client: ApiClient, name: str, done: Any, what: str, *,
                    timeout: float = WAIT_TIMEOUT) -> dict[str, Any] | None:
    """Poll volume *name* until done(volume) (None when it is gone); progress on stderr."""
    return apiclient.wait_for_volume(client, name, done, what, timeout=timeout,
                                     observer=Progress(what))


def wait_for_copy(client: ApiClient, name: str, what: str, timeout: float) -> None:
    """Wait until new volume *name*, being filled by a clone or a restore, is usable."""
    apiclient.wait_for_copy(client, name, what, timeout=timeout, observer=Progress(what))


@volume.command("create")
@click.argument("name")
@click.option("--size", type=SIZE, help="Size, e.g. 10G (required unless --standby).")
@click.option("--replicas", type=click.IntRange(1, 8), default=2, show_default=True)
@click.option("--disk-tag", "disk_tags", multiple=True, help="Place replicas on disks with it.")
@click.option("--node-tag", "node_tags", multiple=True,
              help="Place replicas on nodes with it (a cluster).")
@click.option("--data-locality",
              type=click.Choice(["disabled", "best-effort", "strict-local"]),
              default="disabled", show_default=True,
              help="best-effort: keep a replica on the node it is attached on (one is "
                   "built there in place of another); strict-local: its one replica on the "
                   "node of its engine (the node the API runs on).")
@click.option("--access-mode", type=click.Choice(["rwo", "rwx"]), default="rwo",
              show_default=True,
              help="rwx: shared read-write by many clients over NFS (its file system made "
                   "and exported at once; 'volume share' sets who may mount it).")
@click.option("--standby", is_flag=True,
              help="A standby (DR) volume that follows the backups of --from-backup-volume "
                   "(its size is theirs); it cannot be attached until 'volume activate'.")
@click.option("--from-backup-volume", "backup_volume", metavar="BACKUP_VOLUME",
              help="With --standby: the backup volume on the target to follow.")
@wait_options
@client_options
def volume_create(name: str, size: int | None, replicas: int, disk_tags: tuple[str, ...],
                  node_tags: tuple[str, ...], data_locality: str, access_mode: str,
                  standby: bool, backup_volume: str | None, timeout: float, no_wait: bool,
                  url: str, token_file: Path) -> None:
    """Create volume NAME."""
    client = api(url, token_file)
    if standby or backup_volume:
        if not (standby and backup_volume):
            raise click.UsageError("--standby and --from-backup-volume go together")
        if size is not None or access_mode != "rwo" or data_locality != "disabled" or \
                node_tags:
            raise click.UsageError("a standby volume takes the size of its backups; "
                                   "--size, --access-mode, --data-locality and --node-tag "
                                   "do not apply")
        made = client.call("POST", "/v1/standby-volumes", {
            "name": name, "backup_volume": backup_volume, "replicas": replicas,
            "disk_tags": list(disk_tags)})
        if not no_wait:
            wait_for_copy(client, name, "the first restore", timeout)
        click.echo(f"standby volume {name} created ({format_size_exact(made['size'])}, "
                   f"{replicas} replicas), following backup volume {backup_volume}")
        return
    if size is None:
        raise click.UsageError("--size is required (e.g. --size 10G)")
    body: dict[str, Any] = {"name": name, "size": size, "replicas": replicas,
                            "disk_tags": list(disk_tags)}
    if node_tags:
        body["node_tags"] = list(node_tags)
    if data_locality != "disabled":
        body["data_locality"] = data_locality
    if access_mode != "rwo":
        body["access_mode"] = access_mode
    client.call("POST", "/v1/volumes", body)
    if no_wait:
        click.echo(f"volume {name} requested")
        return
    if access_mode == "rwx":
        info = wait_for_volume(client, name, lambda v: v and (v["share"] or v["refusal"]),
                               "sharing", timeout=timeout)
        assert info is not None
        if info["refusal"]:
            raise FailedPrecondition(info["refusal"])
        click.echo(f"volume {name} created ({format_size_exact(size)}, {replicas} replicas), "
                   f"shared at {_share_text(info['share'])}; no client may mount it until "
                   f"'volume share {name} --allow CIDR' names some")
        return
    wait_for_volume(client, name, lambda v: v and v["state"] != "creating", "creating",
                    timeout=timeout)
    click.echo(f"volume {name} created ({format_size_exact(size)}, {replicas} replicas)")


def _share_text(share: dict[str, Any]) -> str:
    host = f"[{share['address']}]" if ":" in share["address"] else share["address"]
    return f"{host}:{share['path']} (NFS port {share['port']}: mount -t nfs4 -o " \
           f"port={share['port']} {host}:{share['path']} DIR)"


@volume.command("share")
@click.argument("name")
@click.option("--allow", "allow", multiple=True, metavar="CIDR",
              help="A client address or CIDR allowed to mount it (repeatable; replaces the "
                   "list; 0.0.0.0/0 for any IPv4 client). A new RWX volume allows none.")
@click.option("--allow-none", is_flag=True, help="Allow no client (empty the list).")
@click.option("--read-only/--read-write", default=None,
              help="Clients may only read, or read and write (default: unchanged).")
@click.option("--squash", type=click.Choice(["root", "none", "all"]),
              help="root: clients' root is nobody; all: everyone is nobody; none: ids kept "
                   "(default: unchanged; root for a new volume).")
@wait_options
@client_options
def volume_share(name: str, allow: tuple[str, ...], allow_none: bool, read_only: bool | None,
                 squash: str | None, timeout: float, no_wait: bool, url: str,
                 token_file: Path) -> None:
    """Set the NFS export options of RWX volume NAME (those given; applied at once, to
    connected clients too); waits until its NFS server serves with them."""
    if allow and allow_none:
        raise InvalidArgument("--allow and --allow-none exclude each other")
    body: dict[str, Any] = {"read_only": read_only, "squash": squash}
    if allow or allow_none:
        body["allow"] = list(allow)
    client = api(url, token_file)
    info = client.call("POST", f"/v1/volumes/{name}/share", body)
    wanted = {"allow": info["share_allow"], "read_only": info["share_read_only"],
              "squash": info["share_squash"]}
    if info["attached"] and not no_wait:
        info = wait_for_volume(client, name, lambda v: v and (
            (v["share"] or {}).get("options") == wanted or v["refusal"]), "applying",
            timeout=timeout)
        assert info is not None
    click.echo(f"volume {name}: {', '.join(info['share_allow']) or 'no client'}, "
               f"{'read-only' if info['share_read_only'] else 'read-write'}, squash "
               f"{info['share_squash']}"
               + (f"; shared at {_share_text(info['share'])}" if info.get("share") else ""))


volume.add_command(volume_jobs)


def _scrub_text(record: dict[str, Any]) -> str:
    lines = [f"scrub of volume {record['name']}: {record['state']}"
             + (f": {record['summary']}" if record["summary"] else "")
             + (f": {record['error']}" if record["error"] else "")]
    for finding in (record.get("report") or {}).get("findings", []):
        end = finding["offset"] + finding["length"] - 1
        lines.append(f"  snapshot {finding['snapshot']} replica {finding['replica']} bytes "
                     f"{finding['offset']}-{end}: {finding['result']}"
                     + (f" from {finding['source']}" if finding["source"] else "")
                     + (f" ({finding['message']})" if finding["message"] else ""))
    return "\n".join(lines)


@volume.command("activate")
@click.argument("name")
@client_options
def volume_activate(name: str, url: str, token_file: Path) -> None:
    """Apply the newest backup to standby volume NAME and make it a normal volume (it can
    then be attached; it no longer follows the backups)."""
    info = api(url, token_file).call("POST", f"/v1/volumes/{quote(name, safe='')}/activate")
    held = (info.get("standby") or {}).get("last_backup")
    click.echo(f"volume {name} activated, holding backup {held}")


@volume.command("scrub")
@click.argument("name")
@click.option("--wait", is_flag=True, help="Wait for the scrub to end and print what it "
              "found.")
@click.option("--timeout", type=float, default=24 * 3600.0, show_default=True,
              help="Seconds --wait waits (the scrub goes on after it).")
@OUTPUT
@client_options
def volume_scrub(name: str, wait: bool, timeout: float, output: str, url: str,
                 token_file: Path) -> None:
    """Verify every snapshot layer of volume NAME on every replica against its checksums,
    and repair damaged ranges from a replica whose copy verifies (--wait exits 1 when a
    range is lost or unrepaired, or something could not be checked)."""
    client = api(url, token_file)
    path = f"/v1/volumes/{quote(name, safe='')}/scrub"
    record = client.call("POST", path)
    if not wait:
        click.echo(f"scrub of volume {name} started ('appliance volume scrub {name} --wait' "
                   "or the events say how it ends)")
        return
    deadline = time.monotonic() + timeout
    while record["state"] == "running":
        if time.monotonic() > deadline:
            raise Unavailable(f"the scrub of volume {name} did not end in "
                                        f"{timeout:.0f} s (it goes on)")
        time.sleep(0.5)
        record = client.call("GET", path)
    emit(record, output, _scrub_text)
    report = record.get("report") or {}
    if record["state"] != "complete" or report.get("lost") or report.get("unrepaired") or \
            report.get("problems"):
        sys.exit(1)


@volume.command("list")
@OUTPUT
@client_options
def volume_list(output: str, url: str, token_file: Path) -> None:
    """List volumes."""
    emit(api(url, token_file).call("GET", "/v1/volumes"), output, _volume_rows)


def _replica_mode(replica: dict[str, Any]) -> str:
    mode = replica.get("mode") or "-"
    if replica.get("diverged"):
        mode += f" (diverged: branch {replica['diverged'].get('branch', '')[:8]}, kept)"
    elif replica.get("rebuild") and mode == "WO":
        rebuild = replica["rebuild"]
        if rebuild.get("total_bytes"):
            mode += f" (rebuilding {rebuild.get('copied_bytes', 0) / rebuild['total_bytes']:.0%})"
    return mode


def _salvage_line(salvage: dict[str, Any]) -> str:
    given_up = "; ".join(f"{item.get('replica') or item.get('replica_id')} ({item.get('why')})"
                         for item in salvage.get("given_up") or []) or "nothing known"
    return f"salvaged at {salvage.get('at')} from {salvage.get('from')}; given up: {given_up}"


def _volume_detail(v: dict[str, Any]) -> str:
    """One volume: its row, its replicas, its branch, the last salvage, kept branches."""
    replicas = v.get("replica_list", [])
    nodes = len({r.get("node") for r in replicas}) > 1  # a cluster: which node each is on
    lines = [_volume_rows([v]), "", table(
        [[r["name"], *([r["node"]] if nodes else []), r["disk"], _replica_mode(r)]
         for r in replicas], ["REPLICA", *(["NODE"] if nodes else []), "DISK", "MODE"]), ""]
    if v.get("node") and nodes:
        lines.insert(1, f"attached on node {v['node']}")
    if v.get("branch"):
        lines.append(f"branch: {v['branch']}")
    if v.get("salvage"):
        lines.append(_salvage_line(v["salvage"]))
    if v.get("branch_volumes"):
        lines.append("branches kept as volumes: " + ", ".join(v["branch_volumes"]))
    if v.get("source", {}) and v["source"].get("diverged-from"):
        lines.append(f"kept from volume {v['source']['diverged-from']} (branch "
                     f"{v['source'].get('branch', '')[:8]})")
    if v.get("message"):
        lines.append(f"message: {v['message']}")
    return "\n".join(lines).rstrip()


@volume.command("show")
@click.argument("name")
@OUTPUT
@client_options
def volume_show(name: str, output: str, url: str, token_file: Path) -> None:
    """Show volume NAME: its replicas, its branch and its last salvage."""
    emit(api(url, token_file).call("GET", f"/v1/volumes/{name}"), output, _volume_detail)


def _served_or_refused(info: dict[str, Any] | None) -> bool:
    return bool(info and ((info["state"] == "attached" and (
        info["device"] or info["frontend"].get("iqn") or info["share"])) or info["refusal"]))


def _device(info: dict[str, Any] | None) -> str:
    """The device of a volume whose engine serves (its target's URL for the iscsi
    frontend); its refusal as an error otherwise."""
    assert info is not None
    if info["refusal"]:
        raise FailedPrecondition(info["refusal"])
    if info["share"]:  # an RWX volume: shared again
        return f"shared at {_share_text(info['share'])}"
    served = info["frontend"]
    if served.get("iqn"):
        return f"iscsi://{served['portal']}/{served['iqn']}/{served['lun']}"
    return str(info["device"])


def _chap_secret(path: Path | None, option: str) -> str | None:
    """A CHAP secret from a 0600 file (a final newline dropped), never from arguments."""
    if path is None:
        return None
    secret = read_private_file(path, 4097).removesuffix(b"\n")
    try:
        return secret.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidArgument(f"{option} {path}: the secret must be ASCII") from None


@volume.command("attach")
@click.argument("name")
@click.option("--node", help="Run its engine on this node of the cluster (default: the node "
                             "the API runs on).")
@click.option("--force", is_flag=True,
              help="Attached on another node (down, or cut off): move it here anyway; the "
                   "engine there is fenced and can write no more.")
@click.option("--frontend", type=click.Choice(["blockdev", "iscsi"]), default="blockdev",
              show_default=True,
              help="blockdev: a local block device; iscsi: an iSCSI target on the node's "
                   "portal (CHAP required).")
@click.option("--chap-user", metavar="USER",
              help="iscsi: the volume's own CHAP user (default: the node's credentials; "
                   "'volume iscsi' shows them).")
@click.option("--chap-secret-file", type=click.Path(path_type=Path), metavar="FILE",
              help="iscsi: a 0600 file holding the CHAP secret (12 to 255 characters).")
@click.option("--mutual-chap-user", metavar="USER",
              help="iscsi: mutual CHAP: the user the target answers as.")
@click.option("--mutual-chap-secret-file", type=click.Path(path_type=Path), metavar="FILE",
              help="iscsi: mutual CHAP: a 0600 file holding the target's secret.")
@click.option("--initiator", "initiators", multiple=True, metavar="IQN",
              help="iscsi: an initiator allowed to log in (repeatable; default: any that "
                   "passes CHAP).")
@wait_options
@client_options
def volume_attach(name: str, node: str | None, force: bool, frontend: str,
                  chap_user: str | None, chap_secret_file: Path | None,
                  mutual_chap_user: str | None, mutual_chap_secret_file: Path | None,
                  initiators: tuple[str, ...], timeout: float, no_wait: bool,
                  url: str, token_file: Path) -> None:
    """Attach volume NAME as a block device on this node (or --node); print the device
    (with --frontend iscsi: export it as an iSCSI target; print its URL).

    When its engine refuses to start (it cannot prove that every acknowledged write is
    there), the refusal is printed and the volume stays attached-but-faulted: the start is
    tried again by itself, and 'volume salvage' lets an operator choose."""
    if (chap_user is None) != (chap_secret_file is None):
        raise InvalidArgument("--chap-user and --chap-secret-file go together")
    if (mutual_chap_user is None) != (mutual_chap_secret_file is None):
        raise InvalidArgument("--mutual-chap-user and --mutual-chap-secret-file go together")
    if mutual_chap_user and not chap_user:
        raise InvalidArgument("mutual CHAP needs --chap-user and --chap-secret-file too")
    body: dict[str, Any] = {"frontend": frontend, "initiators": list(initiators)}
    if chap_user is not None:
        body["chap"] = {"user": chap_user,
                        "secret": _chap_secret(chap_secret_file, "--chap-secret-file"),
                        "mutual_user": mutual_chap_user or "",
                        "mutual_secret": _chap_secret(mutual_chap_secret_file,
                                                      "--mutual-chap-secret-file") or ""}
    client = api(url, token_file)
    query = "&".join(([f"node={quote(node, safe='')}"] if node else [])
                     + (["force=true"] if force else []))
    client.call("POST", f"/v1/volumes/{name}/attach" + (f"?{query}" if query else ""), body)
    if no_wait:
        click.echo(f"volume {name} attaching ('volume show {name}' gives its device)")
        return
    click.echo(_device(wait_for_volume(client, name, _served_or_refused, "attaching",
                                       timeout=timeout)))


@volume.command("iscsi")
@click.argument("name")
@click.option("--secret-file", type=click.Path(path_type=Path), metavar="FILE",
              help="Write the CHAP secret to FILE (made 0600; an existing file is not "
                   "replaced) and use it in the commands.")
@OUTPUT
@client_options
def volume_iscsi(name: str, secret_file: Path | None, output: str, url: str,
                 token_file: Path) -> None:
    """Print the open-iscsi (iscsiadm) commands that discover volume NAME's target and log
    in to it from a client machine."""
    client = api(url, token_file)
    info = client.call("GET", f"/v1/volumes/{name}/iscsi"
                       + ("?secret=true" if secret_file else ""))
    if secret_file is not None:
        mutual_file = secret_file.with_name(secret_file.name + ".mutual")
        for path in (secret_file, mutual_file) if info.get("mutual_secret") else (secret_file,):
            if path.exists():
                raise FailedPrecondition(f"{path} exists; name a new --secret-file")
        try:
            write_secret_file(secret_file, str(info.pop("secret")).encode() + b"\n")
        except FileExistsError:
            raise FailedPrecondition(f"--secret-file {secret_file} exists; name a new file"
                                     ) from None
        mutual = info.pop("mutual_secret", "")
        if mutual:
            try:
                write_secret_file(mutual_file, str(mutual).encode() + b"\n")
            except FileExistsError:
                raise FailedPrecondition(f"{mutual_file} exists; name a new --secret-file"
                                         ) from None
    emit(info, output, lambda data: _iscsiadm_commands(data, secret_file))


def _iscsiadm_commands(info: dict[str, Any], secret_file: Path | None) -> str:
    portal, iqn = info["portal"], info["iqn"]
    node = f"iscsiadm -m node -T {iqn} -p {portal}"
    secret = f'"$(cat {secret_file})"' if secret_file else '"$CHAP_SECRET"'
    lines = [f"# target {iqn}, LUN {info['lun']}, on portal {portal}; CHAP user "
             f"{info['user']}"]
    if secret_file is None:
        lines.append("# the CHAP secret: 'volume iscsi NAME --secret-file FILE' writes it to "
                     "FILE; or read it into CHAP_SECRET (read -rs CHAP_SECRET)")
    lines.append("# (iscsiadm takes the secret as an argument, visible to the client's other "
                 "users while it runs; on shared machines set it in the node record file)")
    lines += [
        f"iscsiadm -m discoverydb -t sendtargets -p {portal} -o new",
        f"iscsiadm -m discoverydb -t sendtargets -p {portal} -o update "
        "-n discovery.sendtargets.auth.authmethod -v CHAP",
        f"iscsiadm -m discoverydb -t sendtargets -p {portal} -o update "
        f"-n discovery.sendtargets.auth.username -v {info['user']}",
        f"iscsiadm -m discoverydb -t sendtargets -p {portal} -o update "
        f"-n discovery.sendtargets.auth.password -v {secret}",
        f"iscsiadm -m discoverydb -t sendtargets -p {portal} --discover",
        f"{node} -o update -n node.session.auth.authmethod -v CHAP",
        f"{node} -o update -n node.session.auth.username -v {info['user']}",
        f"{node} -o update -n node.session.auth.password -v {secret}",
    ]
    if info.get("mutual_user"):
        mutual = f'"$(cat {secret_file}.mutual)"' if secret_file else '"$MUTUAL_SECRET"'
        lines += [f"{node} -o update -n node.session.auth.username_in -v {info['mutual_user']}",
                  f"{node} -o update -n node.session.auth.password_in -v {mutual}"]
    lines.append(f"{node} --login")
    return "\n".join(lines)


@volume.command("salvage")
@click.argument("name")
@click.option("--from", "source", metavar="REPLICA",
              help="Serve this replica (a name from 'volume show'); replicas that may hold "
                   "writes it lacks are kept as volumes of their own. Default: the best "
                   "reachable member of the newest membership.")
@wait_options
@client_options
def volume_salvage(name: str, source: str | None, timeout: float, no_wait: bool, url: str,
                   token_file: Path) -> None:
    """Start the engine of volume NAME, which faulted or was refused, accepting that
    acknowledged writes may be missing; print what was given up."""
    client = api(url, token_file)
    asked = client.call("POST", f"/v1/volumes/{name}/salvage",
                        {"from": source} if source else None)
    number = asked["salvage_request"]["id"]
    if no_wait:
        click.echo(f"volume {name}: salvage request {number} made")
        return
    info = wait_for_volume(client, name, lambda v: v and v["salvage_done"] >= number and
                           _served_or_refused(v), "salvaging", timeout=timeout)
    device = _device(info)
    assert info is not None
    if info["salvage"] and info["salvage"] != asked["salvage"]:
        click.echo(f"volume {name} {_salvage_line(info['salvage'])}")
    else:
        click.echo(f"volume {name} serves again: no acknowledged write was missing")
    click.echo(device)


FORCE = click.option("--force", is_flag=True,
                     help="Even while its device is mounted or open: what is mounted is "
                          "unmounted first (lazily when busy); open files on it fail.")


@volume.command("detach")
@click.argument("name")
@FORCE
@wait_options
@client_options
def volume_detach(name: str, force: bool, timeout: float, no_wait: bool, url: str,
                  token_file: Path) -> None:
    """Detach volume NAME (refused while its device is mounted or open)."""
    client = api(url, token_file)
    client.call("POST", f"/v1/volumes/{name}/detach" + ("?force=true" if force else ""))
    if no_wait:
        click.echo(f"volume {name} detaching")
        return
    wait_for_volume(client, name, lambda v: v and v["state"] == "detached", "detaching",
                    timeout=timeout)
    click.echo(f"volume {name} detached")


@volume.command("delete")
@click.argument("name")
@FORCE
@wait_options
@client_options
def volume_delete(name: str, force: bool, timeout: float, no_wait: bool, url: str,
                  token_file: Path) -> None:
    """Delete volume NAME and its data (refused while its device is mounted or open)."""
    client = api(url, token_file)
    client.call("DELETE", f"/v1/volumes/{name}" + ("?force=true" if force else ""))
    if no_wait:
        click.echo(f"volume {name} deleting")
        return
    wait_for_volume(client, name, lambda v: v is None, "deleting", timeout=timeout)
    click.echo(f"volume {name} deleted")


@volume.command("expand")
@click.argument("name")
@click.option("--size", required=True, type=SIZE, help="The new size, e.g. 20G.")
@click.option("--resize-fs", is_flag=True,
              help="Grow the ext2/3/4 or xfs file system on the attached device too, "
                   "mounted (online) or not.")
@client_options
def volume_expand(name: str, size: int, resize_fs: bool, url: str, token_file: Path) -> None:
    """Grow volume NAME to SIZE (attached or detached)."""
    client = api(url, token_file)
    before = client.call("GET", f"/v1/volumes/{name}")["size"]
    info = client.call("POST", f"/v1/volumes/{name}/expand",
                       {"size": size, "resize_fs": resize_fs})
    if info["size"] == before:
        click.echo(f"volume {name} is already {format_size_exact(before)}"
                   + (" (its file system grown to fill it)" if resize_fs else ""))
    else:
        click.echo(f"volume {name} expanded from {format_size_exact(before)} to "
                   f"{format_size_exact(info['size'])}"
                   + (" with its file system" if resize_fs else ""))


@volume.command("clone")
@click.argument("source")
@click.argument("name")
@click.option("--snapshot", help="The snapshot to clone (default: one taken now).")
@click.option("--replicas", type=click.IntRange(1, 8), help="Default: as the source.")
@wait_options
@client_options
def volume_clone(source: str, name: str, snapshot: str | None, replicas: int | None,
                 timeout: float, no_wait: bool, url: str, token_file: Path) -> None:
    """Create volume NAME holding a snapshot of volume SOURCE."""
    client = api(url, token_file)
    client.call("POST", f"/v1/volumes/{source}/clone",
                {"name": name, "snapshot": snapshot, "replicas": replicas})
    if no_wait:
        click.echo(f"volume {name} cloning from {source}")
        return
    wait_for_copy(client, name, "cloning", timeout)
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


def _kept(items: list[dict[str, Any]]) -> dict[str, str]:
    """Why each removed snapshot is still there (purge merges a removed snapshot into its
    one child; one with two children, after a revert, is shared by both branches)."""
    children: dict[str, int] = {}
    for item in items:
        if item["parent"]:
            children[item["parent"]] = children.get(item["parent"], 0) + 1
    return {item["name"]: (f"removed, kept: {children[item['name']]} snapshots or branches "
                           "depend on it" if children.get(item["name"], 0) > 1
                           else "removed, until 'snapshot purge'")
            for item in items if item["removed"]}


def mounted_text(info: dict[str, Any]) -> str:
    what = f"snapshot {info['snapshot']} of volume {info['volume']}" \
        if info["kind"] == "snapshot" else f"backup {info['backup']} of volume {info['volume']}"
    return f"{what} mounted read-only at {info['path']} ({info['fs_type']}, {info['loop']})"


@snapshot.command("mount")
@click.argument("volume_name", metavar="VOLUME")
@click.argument("name")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@client_options
def snapshot_mount(volume_name: str, name: str, directory: Path, url: str,
                   token_file: Path) -> None:
    """Mount the file system in snapshot NAME of VOLUME read-only at DIR (an empty
    directory on the node the API runs on), attached or not; the snapshot never changes."""
    info = api(url, token_file).call("POST", "/v1/mounts", {
        "kind": "snapshot", "volume": volume_name, "snapshot": name,
        "path": str(directory.absolute())})
    click.echo(mounted_text(info))


@snapshot.command("umount")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@client_options
def snapshot_umount(directory: Path, url: str, token_file: Path) -> None:
    """Unmount the snapshot mounted at DIR."""
    api(url, token_file).call("POST", "/v1/mounts/umount", {"path": str(directory.absolute())})
    click.echo(f"{directory.absolute()} unmounted")


@snapshot.command("list")
@click.argument("volume_name", metavar="VOLUME")
@click.option("--all", "show_all", is_flag=True,
              help="Also the removed snapshots whose space is not reclaimed yet.")
@OUTPUT
@client_options
def snapshot_list(volume_name: str, show_all: bool, output: str, url: str,
                  token_file: Path) -> None:
    """List the snapshots of VOLUME, oldest first (removed ones with --all)."""
    items = api(url, token_file).call("GET", f"/v1/volumes/{volume_name}/snapshots")
    kept = _kept(items)
    shown = items if show_all else [s for s in items if not s["removed"]]
    emit(shown, output, lambda rows: table(
        [[s["name"], s["parent"] or "-", s["created"] or "-", format_size(s["actual_size"]),
          kept.get(s["name"], "-")] for s in rows],
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
    client = api(url, token_file)
    client.call("POST", f"/v1/volumes/{volume_name}/purge")
    click.echo(f"snapshots of volume {volume_name} purged")
    for name, why in _kept(client.call("GET", f"/v1/volumes/{volume_name}/snapshots")).items():
        click.echo(f"snapshot {name}: {why}", err=True)


# -- events ---------------------------------------------------------------------------------

FOLLOW_INTERVAL = 1.0  # seconds between two looks for new events


def _event_rows(items: list[dict[str, Any]]) -> str:
    return table([[e["time"], e["volume"] or "-", e["kind"], e["message"]] for e in items],
                 ["TIME", "VOLUME", "KIND", "MESSAGE"])


def _events_path(volume_name: str | None, after: int) -> str:
    query = [f"after={after}"] if after else []
    if volume_name:
        query.append(f"volume={quote(volume_name, safe='')}")
    return "/v1/events" + ("?" + "&".join(query) if query else "")


@click.command("events")
@click.option("--volume", "volume_name", help="Only the events of this volume.")
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing new events as they happen (until interrupted); with "
                   "-o json one JSON object per line.")
@OUTPUT
@client_options
def events(volume_name: str | None, follow: bool, output: str, url: str,
           token_file: Path) -> None:
    """What happened, oldest first: volume state and robustness changes, replicas failed,
    rebuilt and back, salvages, refused starts, snapshots, expansions, clones, restores,
    backups, forced detaches; disks and settings (volume '-'). The newest 1000 are kept."""
    client = api(url, token_file)
    items = client.call("GET", _events_path(volume_name, 0))
    if not follow:
        emit(items, output, _event_rows)
        return
    last = items[-1]["sequence"] if items else 0
    _print_follow(items, output)
    # runs until interrupted, even when started with SIGINT ignored (in the background of
    # a script, which is how a shell starts it)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            time.sleep(FOLLOW_INTERVAL)
            items = client.call("GET", _events_path(volume_name, last))
            if items:
                last = items[-1]["sequence"]
                _print_follow(items, output)
    except KeyboardInterrupt:
        return


def _print_follow(items: list[dict[str, Any]], output: str) -> None:
    for item in items:
        if output == "table":
            click.echo(f"{item['time']}  {item['volume'] or '-'}  {item['kind']}  "
                       f"{item['message']}")
        else:
            click.echo(json.dumps(item, sort_keys=True))


@click.group()
def event() -> None:
    """Events (also 'appliance events', which can follow them)."""


@event.command("list")
@click.option("--volume", "volume_name", help="Only the events of this volume.")
@OUTPUT
@client_options
def event_list(volume_name: str | None, output: str, url: str, token_file: Path) -> None:
    """List the newest events, oldest first."""
    emit(api(url, token_file).call("GET", _events_path(volume_name, 0)), output, _event_rows)
