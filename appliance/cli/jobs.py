"""``appliance job``: recurring jobs (docs/recurring-jobs.md), and ``appliance volume jobs``:
the jobs a volume takes part in."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from appliance.cli.client import api, client_options
from appliance.cli.output import emit, table
from appliance.cli.params import LABEL
from appliance.control.objects import TASKS

OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]),
                      default="table", show_default=True, help="Output format.")


@click.group()
def job() -> None:
    """Recurring jobs: snapshots, backups, cleanups, trims and scrubs on a cron schedule."""


@job.command("create")
@click.argument("name")
@click.option("--task", required=True, type=click.Choice(TASKS),
              help="What the job does to each of its volumes.")
@click.option("--cron", "schedule", required=True, metavar="EXPR",
              help="When: five cron fields in UTC, e.g. '0 */6 * * *' (every 6 hours).")
@click.option("--retain", type=int, default=1, show_default=True,
              help="Snapshots or backups the job keeps per volume (1-250).")
@click.option("--concurrency", type=int, default=1, show_default=True,
              help="Volumes it works on at once (1-64).")
@click.option("--group", "groups", multiple=True,
              help="A group it belongs to ('default': volumes with no jobs of their own); "
                   "repeatable.")
@click.option("--label", "labels", multiple=True, type=LABEL,
              help="KEY=VALUE put on what it makes; repeatable.")
@client_options
def job_create(name: str, task: str, schedule: str, retain: int, concurrency: int,
               groups: tuple[str, ...], labels: tuple[tuple[str, str], ...], url: str,
               token_file: Path) -> None:
    """Create recurring job NAME."""
    made = api(url, token_file).call("POST", "/v1/jobs", {
        "name": name, "task": task, "cron": schedule, "retain": retain,
        "concurrency": concurrency, "groups": list(groups), "labels": dict(labels)})
    click.echo(f"job {name} created: {task} at '{made['cron']}' (UTC), next run "
               f"{made['next_run']}")


def _job_rows(items: list[dict[str, Any]]) -> str:
    return table([[j["name"], j["task"], j["cron"], str(j["retain"]),
                   ",".join(j["groups"]) or "-", str(len(j["volumes"])), j["next_run"],
                   _last(j["last_run"])] for j in items],
                 ["NAME", "TASK", "CRON", "RETAIN", "GROUPS", "VOLUMES", "NEXT RUN",
                  "LAST RUN"])


def _last(run: dict[str, Any] | None) -> str:
    return f"{run['started']} {run['state']}" if run else "-"


@job.command("list")
@OUTPUT
@client_options
def job_list(output: str, url: str, token_file: Path) -> None:
    """List the recurring jobs."""
    emit(api(url, token_file).call("GET", "/v1/jobs"), output, _job_rows)


def _job_detail(j: dict[str, Any]) -> str:
    lines = [f"name: {j['name']}", f"task: {j['task']}", f"cron: {j['cron']} (UTC)",
             f"retain: {j['retain']}", f"concurrency: {j['concurrency']}",
             f"groups: {', '.join(j['groups']) or '-'}",
             "labels: " + (", ".join(f"{k}={v}" for k, v in sorted(j["labels"].items()))
                           or "-"),
             f"volumes: {', '.join(j['volumes']) or '-'}", f"next run: {j['next_run']}",
             f"failed runs: {j['failures']}", "runs:"]
    if not j["runs"]:
        lines.append("  (none yet)")
    for run in j["runs"]:
        lines.append(f"  {run['id']}: {run['trigger']} {run['slot']}, started "
                     f"{run['started']}, {run['state']}"
                     + (f" at {run['finished']}" if run["finished"] else "")
                     + (f": {run['message']}" if run["message"] else ""))
        for volume, part in sorted(run["volumes"].items()):
            lines.append(f"    {volume}: {part['result']}"
                         + (f": {part['message']}" if part["message"] else ""))
    return "\n".join(lines)


@job.command("show")
@click.argument("name")
@OUTPUT
@client_options
def job_show(name: str, output: str, url: str, token_file: Path) -> None:
    """Show recurring job NAME and its recent runs."""
    emit(api(url, token_file).call("GET", f"/v1/jobs/{quote(name, safe='')}"), output,
         _job_detail)


@job.command("delete")
@click.argument("name")
@client_options
def job_delete(name: str, url: str, token_file: Path) -> None:
    """Delete recurring job NAME (what it made stays)."""
    api(url, token_file).call("DELETE", f"/v1/jobs/{quote(name, safe='')}")
    click.echo(f"job {name} deleted")


@job.command("run")
@click.argument("name")
@client_options
def job_run(name: str, url: str, token_file: Path) -> None:
    """Run recurring job NAME now, besides its schedule ('job show' follows it)."""
    run = api(url, token_file).call("POST", f"/v1/jobs/{quote(name, safe='')}/run")
    click.echo(f"job {name}: run {run['id']} started on {len(run['volumes'])} volume(s)")


@click.command("jobs")
@click.argument("name")
@click.option("--add", "add", multiple=True, metavar="JOB|GROUP",
              help="Take part in this job, or in the jobs of this group; repeatable.")
@click.option("--remove", "remove", multiple=True, metavar="JOB|GROUP",
              help="No longer take part in it; repeatable.")
@OUTPUT
@client_options
def volume_jobs(name: str, add: tuple[str, ...], remove: tuple[str, ...], output: str,
                url: str, token_file: Path) -> None:
    """Choose the recurring jobs volume NAME takes part in (by job name or group; a volume
    naming none takes part in the jobs of group 'default')."""
    if not add and not remove:
        raise click.UsageError("give --add or --remove (a job or group name)")
    answer = api(url, token_file).call("POST", f"/v1/volumes/{quote(name, safe='')}/jobs",
                                       {"add": list(add), "remove": list(remove)})
    emit(answer, output, lambda a: "\n".join([
        f"volume {a['volume']}", f"jobs: {', '.join(a['jobs']) or '-'}",
        f"groups: {', '.join(a['groups']) or '-'}",
        f"runs in: {', '.join(a['effective']) or '-'}"]))
