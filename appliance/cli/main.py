"""The ``appliance`` program: command groups, and the one place where errors become exit
codes (0 ok, 1 operation failed, 2 bad input)."""

from __future__ import annotations

import importlib
import sys
import traceback

import click

from appliance import __version__
from appliance.errors import ApplianceError, Corruption

# Command groups are imported when used: a client command does not pay for the replica
# store, the engine or the backup code (the CLI starts in half the time).
COMMANDS = {
    "replica": "appliance.cli.replica:replica",
    "engine": "appliance.cli.engine:engine",
    "serve": "appliance.cli.node:serve",
    "disk": "appliance.cli.node:disk",
    "volume": "appliance.cli.node:volume",
    "snapshot": "appliance.cli.node:snapshot",
    "event": "appliance.cli.node:event",
    "events": "appliance.cli.node:events",
    "job": "appliance.cli.jobs:job",
    "backup-target": "appliance.cli.backup:backup_target",
    "backup": "appliance.cli.backup:backup",
    "settings": "appliance.cli.settings:settings",
    "node": "appliance.cli.admin:node",
    "version": "appliance.cli.admin:version",
    "completion": "appliance.cli.admin:completion",
    "csi": "appliance.cli.csi:csi",
    "check": "appliance.cli.check:check",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appliance")
def cli() -> None:
    """Replicated block storage for bare-metal Linux nodes."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return its exit status."""
    try:
        # Without standalone mode click returns the status given to ctx.exit().
        status = cli.main(args=argv, prog_name="appliance", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.ClickException, click.exceptions.Abort, ApplianceError,
            BrokenPipeError) as exc:
        return _report(exc)
    except Exception:  # a bug: show everything
        traceback.print_exc()
        return 70
    return status if isinstance(status, int) else 0


def _report(exc: Exception) -> int:
    if isinstance(exc, click.ClickException):
        exc.show()
        return exc.exit_code
    if isinstance(exc, click.exceptions.Abort):
        click.echo("aborted", err=True)
        return 1
    if isinstance(exc, ApplianceError):
        prefix = "damaged data: " if isinstance(exc, Corruption) else ""
        click.echo(f"error: {prefix}{exc.message}", err=True)
        return exc.exit_code
    return 1  # BrokenPipeError: the reader went away


def run() -> None:
    sys.exit(main())
