"""Commands about the program and the node rather than its volumes: ``appliance version``,
``appliance node show`` and ``appliance completion``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from click.shell_completion import get_completion_class

from appliance import __version__
from appliance.cli.client import api, client_options
from appliance.cli.output import emit, emit_json, table
from appliance.errors import ApplianceError, Unavailable
from appliance.units import format_size

OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]),
                      default="table", show_default=True, help="Output format.")
SHELLS = ("bash", "zsh", "fish")


# -- version --------------------------------------------------------------------------------


@click.command()
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@client_options
@click.pass_context
def version(ctx: click.Context, output: str, url: str, token_file: Path) -> None:
    """Print the versions of this client and of the node daemon (exit status 1, and the
    daemon's version unknown, when the daemon cannot be asked)."""
    daemon: str | None = None
    problem: ApplianceError | None = None
    try:  # the OpenAPI document: every daemon version has it
        daemon = str(api(url, token_file).call("GET", "/openapi.json")["info"]["version"])
    except ApplianceError as exc:
        problem = exc
    except (KeyError, TypeError):
        problem = ApplianceError(f"the appliance API at {url} does not say its version")
    if output == "json":
        emit_json({"client": __version__, "daemon": daemon, "url": url,
                   "error": problem.message if problem else None})
    else:
        click.echo(f"client: {__version__}")
        if daemon is None:
            click.echo(f"daemon: unknown ({url})")
        else:
            differs = "" if daemon == __version__ else ", not the client's"
            click.echo(f"daemon: {daemon} ({url}{differs})")
    if problem is not None:
        click.echo(f"error: {problem.message}", err=True)
        ctx.exit(problem.exit_code)


# -- node -----------------------------------------------------------------------------------


@click.group()
def node() -> None:
    """The nodes of the cluster, and the node the API runs on."""


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{number} {name}" for name, number in counts.items())


def _render_node(info: dict[str, Any]) -> str:
    ports = info["replica_ports"]
    volumes = info["volumes"]
    processes = info["processes"]
    summary = str(volumes["total"])
    if volumes["total"]:
        summary += f": {_counts(volumes['states'])} ({_counts(volumes['robustness'])})"
    facts = [
        ["name", info["name"]],
        ["version", f"{info['version']} (daemon pid {info['pid']})"],
        ["data directory", info["data_dir"]],
        ["API", info["api_listen"]],
        ["replica ports", f"{info['replica_address']}:{ports['first']}-{ports['last']}: "
                          f"{ports['free']} free, {ports['assigned']} assigned to replicas, "
                          f"{ports['taken']} taken by other programs ({ports['total']} in all)"],
        ["volumes", summary],
        ["engines", f"{len(processes['engines'])} running"],
        ["replica servers", f"{len(processes['replica_servers'])} running"],
    ]
    width = max(len(key) for key, _ in facts)
    parts = ["\n".join(f"{key.ljust(width)}  {value}" for key, value in facts)]
    parts.append(table([[d["name"], d["path"], format_size(d["capacity"]),
                         format_size(d["available"]), format_size(d["scheduled"]),
                         ",".join(d["tags"]) or "-"] for d in info["disks"]],
                       ["DISK", "PATH", "CAPACITY", "AVAILABLE", "SCHEDULED", "TAGS"]))
    rows = [["engine", e["volume"], "-", "-", str(e["pid"])] for e in processes["engines"]]
    rows += [["replica-server", s["volume"], s["replica"], str(s["port"]), str(s["pid"])]
             for s in processes["replica_servers"]]
    if rows:
        parts.append(table(rows, ["PROCESS", "VOLUME", "REPLICA", "PORT", "PID"]))
    return "\n\n".join(parts)


def _render_cluster_node(node: dict[str, Any]) -> str:
    labels = ",".join(f"{k}={v}" for k, v in node["labels"].items()) or "-"
    heartbeat = node["last_heartbeat"]
    facts = [
        ["name", node["name"] + (" (leader)" if node["leader"] else "")],
        ["state", node["state"]],
        ["address", node["address"]],
        ["API", node["api"]],
        ["zone", node["zone"] or "-"],
        ["labels", labels],
        ["tags", ",".join(node["tags"]) or "-"],
        ["replicas", str(node["replicas"])],
        ["version", node["version"]],
        ["joined", node["joined"]],
        ["last heartbeat", time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(heartbeat))
         if heartbeat else "- (down)"],
    ]
    width = max(len(key) for key, _ in facts)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in facts)


def _render_nodes(nodes: list[dict[str, Any]]) -> str:
    return table([[n["name"] + ("*" if n["leader"] else ""), n["state"], n["address"],
                   n["zone"] or "-", ",".join(n["tags"]) or "-", str(n["replicas"]),
                   n["version"]] for n in nodes],
                 ["NAME", "STATE", "ADDRESS", "ZONE", "TAGS", "REPLICAS", "VERSION"])


@node.command("list")
@OUTPUT
@client_options
def node_list(output: str, url: str, token_file: Path) -> None:
    """The nodes of the cluster: state (ready, down, cordoned), address, zone, tags and
    replica count; the leader is marked with *."""
    emit(api(url, token_file).call("GET", "/v1/nodes"), output, _render_nodes)


@node.command("show")
@click.argument("name", required=False)
@OUTPUT
@client_options
def node_show(name: str | None, output: str, url: str, token_file: Path) -> None:
    """Node NAME as the cluster sees it (state, address, zone, labels, tags, replicas,
    last heartbeat); without NAME, the node the API runs on: version, data directory,
    addresses, free replica ports, disks, volumes by state, and the engines and replica
    servers running (with their pids)."""
    client = api(url, token_file)
    if name is None:
        emit(client.call("GET", "/v1/node"), output, _render_node)
    else:
        emit(client.call("GET", f"/v1/nodes/{quote(name, safe='')}"), output,
             _render_cluster_node)


@node.command("cordon")
@click.argument("name")
@client_options
def node_cordon(name: str, url: str, token_file: Path) -> None:
    """Place no new replicas on node NAME (those it has stay)."""
    api(url, token_file).call("POST", f"/v1/nodes/{quote(name, safe='')}/cordon")
    click.echo(f"node {name} cordoned")


@node.command("uncordon")
@click.argument("name")
@client_options
def node_uncordon(name: str, url: str, token_file: Path) -> None:
    """Let node NAME take new replicas again."""
    api(url, token_file).call("POST", f"/v1/nodes/{quote(name, safe='')}/uncordon")
    click.echo(f"node {name} uncordoned")


@node.command("drain")
@click.argument("name")
@click.option("--wait", is_flag=True, help="Wait until no replica is left on the node.")
@click.option("--timeout", type=float, default=3600.0, show_default=True,
              help="Seconds --wait waits (the drain goes on after it).")
@client_options
def node_drain(name: str, wait: bool, timeout: float, url: str, token_file: Path) -> None:
    """Cordon node NAME and move every replica on it to other nodes: each is rebuilt
    elsewhere before it leaves, so volumes stay healthy throughout (a detached volume is
    attached, without a device, for the time of its rebuild). Refused, changing nothing,
    when another node cannot take one of them."""
    client = api(url, token_file)
    path = f"/v1/nodes/{quote(name, safe='')}"
    shown = client.call("POST", path + "/drain")
    if not wait:
        click.echo(f"node {name} draining: {shown['replicas']} replica(s) to move "
                   f"('node show {name}' counts them)")
        return
    deadline = time.monotonic() + timeout
    left = shown["replicas"]
    while left:
        if time.monotonic() > deadline:
            raise Unavailable(f"node {name} still has {left} replica(s) after {timeout:.0f} "
                              "s; the drain goes on")
        time.sleep(1)
        now = client.call("GET", path)["replicas"]
        if now != left:
            click.echo(f"node {name}: {now} replica(s) left", err=True)
        left = now
    click.echo(f"node {name} drained")


@node.command("label")
@click.argument("name")
@click.argument("labels", nargs=-1, required=True, metavar="KEY=VALUE|KEY- ...")
@client_options
def node_label(name: str, labels: tuple[str, ...], url: str, token_file: Path) -> None:
    """Set labels of node NAME (KEY- removes one). The label ``zone`` is the node's zone:
    replicas of a volume go to different zones when they can."""
    changes: dict[str, str | None] = {}
    for item in labels:
        if item.endswith("-") and "=" not in item:
            changes[item[:-1]] = None
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE or KEY-",
                                     param_hint="LABELS")
        changes[key] = value
    node = api(url, token_file).call("PATCH", f"/v1/nodes/{quote(name, safe='')}",
                                     {"labels": changes})
    click.echo(f"node {name} labels: "
               + (",".join(f"{k}={v}" for k, v in node["labels"].items()) or "none"))


# -- completion -----------------------------------------------------------------------------


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL (bash, zsh or fish).

    \b
    bash:  appliance completion bash > /etc/bash_completion.d/appliance
           (or eval "$(appliance completion bash)" in ~/.bashrc)
    zsh:   eval "$(appliance completion zsh)" in ~/.zshrc, after compinit
    fish:  appliance completion fish > ~/.config/fish/completions/appliance.fish
    """
    root = ctx.find_root()
    program = root.info_name or "appliance"
    # the variable click's Command.main looks for: _APPLIANCE_COMPLETE
    variable = f"_{program.replace('-', '_').replace('.', '_')}_COMPLETE".upper()
    script = get_completion_class(shell)
    assert script is not None  # one of SHELLS, which click knows
    source = script(root.command, {}, program, variable).source()
    click.echo(source, nl=not source.endswith("\n"))
