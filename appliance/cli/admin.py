"""Commands about the program and the node rather than its volumes: ``appliance version``,
``appliance node show`` and ``appliance completion``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.shell_completion import get_completion_class

from appliance import __version__
from appliance.cli.client import api, client_options
from appliance.cli.output import emit, emit_json, table
from appliance.errors import ApplianceError
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
    """This node: its configuration, disks, volumes and processes."""


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


@node.command("show")
@OUTPUT
@client_options
def node_show(output: str, url: str, token_file: Path) -> None:
    """Version, data directory, addresses, free replica ports, disks, volumes by state,
    and the engines and replica servers running (with their pids)."""
    emit(api(url, token_file).call("GET", "/v1/node"), output, _render_node)


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
