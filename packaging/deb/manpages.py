"""Write the man pages of the ``appliance`` command and every subcommand (click-man), from
the CLI's own help: ``python packaging/deb/manpages.py VERSION DIR``."""

from __future__ import annotations

import sys
import time

import click
from click_man.core import write_man_pages

from appliance.cli.main import COMMANDS, cli


def main(version: str, target: str) -> None:
    # The CLI loads its command groups lazily; click-man walks a group's loaded commands.
    ctx = click.Context(cli)
    loaded = {name: cli.get_command(ctx, name) for name in COMMANDS}
    whole = click.Group("appliance", help=cli.help,
                        commands={name: command for name, command in loaded.items() if command})
    write_man_pages("appliance", whole, version=version, target_dir=target,
                    date=time.strftime("%Y-%m-%d", time.gmtime()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
