"""``appliance check``: whether this machine can run the node (appliance/hostcheck/)."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import click

from appliance.cli.output import emit_json
from appliance.hostcheck.result import DEFAULT_CONFIG, Result, counts, load_settings
from appliance.hostcheck.runner import run_checks

HEADERS = ("CHECK", "STATUS", "DETAIL")


def plural(number: int, word: str) -> str:
    return f"{number} {word}{'' if number == 1 else 's'}"


def summary(results: list[Result]) -> str:
    found = counts(results)
    return (f"{found['ok']} ok, {plural(found['warn'], 'warning')}, "
            f"{plural(found['fail'], 'failure')}")


def wrap(text: str, width: int, indent: str = "") -> list[str]:
    """*text* in lines of *width*, paths and words unbroken."""
    return textwrap.wrap(text, width, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def render(results: list[Result], width: int) -> str:
    """CHECK, STATUS and DETAIL columns, the detail wrapped to *width*, the remedy of a
    warning or failure under it; the summary last."""
    name_width = max(len(HEADERS[0]), *(len(r.name) for r in results))
    indent = name_width + 2 + len("STATUS") + 2
    text_width = max(40, width - indent)
    lines = [f"{HEADERS[0]:<{name_width}}  {HEADERS[1]:<6}  {HEADERS[2]}"]
    for result in results:
        detail = wrap(result.detail, text_width) or [""]
        lines.append(f"{result.name:<{name_width}}  {result.status:<6}  {detail[0]}")
        lines += [" " * indent + line for line in detail[1:]]
        if result.status != "ok" and result.remedy:
            lines += [" " * indent + line for line in
                      wrap("fix: " + result.remedy, text_width, "     ")]
    lines.append(summary(results))
    return "\n".join(lines)


@click.command()
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help=f"The node's TOML config (default {DEFAULT_CONFIG}, when it exists).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The data directory to check (default: the config's, or "
                   "/var/lib/appliance); nothing is created there.")
@click.option("--disk", "disks", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Also check this directory as a disk for replicas; repeat for more.")
@click.pass_context
def check(ctx: click.Context, output: str, config_file: Path | None, data_dir: Path | None,
          disks: tuple[Path, ...]) -> None:
    """Check whether this machine can run the node: kernel (FUSE, loop, nbd, iscsi_tcp,
    nfs), packages, nbdkit's Python, the data directory and disks, ports, clock,
    multipath and, in a cluster, etcd and the cluster key. Each item is ok, warn or fail,
    with what to do. Exit status 0 when nothing fails (warnings allowed), 1 when an item
    fails, 2 on bad input."""
    if config_file is None and DEFAULT_CONFIG.exists():
        config_file = DEFAULT_CONFIG
    results = run_checks(load_settings(config_file, data_dir, disks))
    if output == "json":
        emit_json({"ok": all(r.status != "fail" for r in results),
                   "checks": [r.as_dict() for r in results]})
    else:
        click.echo(render(results, shutil.get_terminal_size((100, 24)).columns))
    if any(r.status == "fail" for r in results):
        ctx.exit(1)
