"""The ``appliance`` program: command groups, and the one place where errors become exit
codes (0 ok, 1 operation failed, 2 bad input)."""

from __future__ import annotations

import sys
import traceback

import click

from appliance import __version__
from appliance.cli.backup import backup, backup_target
from appliance.cli.engine import engine
from appliance.cli.node import disk, serve, snapshot, volume
from appliance.cli.replica import replica
from appliance.errors import ApplianceError, Corruption


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appliance")
def cli() -> None:
    """Replicated block storage for bare-metal Linux nodes."""


cli.add_command(replica)
cli.add_command(engine)
cli.add_command(serve)
cli.add_command(disk)
cli.add_command(volume)
cli.add_command(snapshot)
cli.add_command(backup_target)
cli.add_command(backup)


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
