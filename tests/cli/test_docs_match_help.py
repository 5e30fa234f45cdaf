"""docs/cli.md matches the program: every command has its row (or section), and the row
names every option the command takes, except the options every client command shares
(documented once); every command the reference names exists."""

from __future__ import annotations

import re
from pathlib import Path

import click

from appliance.cli.main import cli

DOCS = Path(__file__).resolve().parent.parent.parent / "docs" / "cli.md"
# documented once for all client commands (docs/cli.md, "The node")
SHARED = {"--url", "--token-file", "--output", "--help", "--timeout", "--no-wait"}


def leaves(group: click.Group, prefix: tuple[str, ...] = ()) -> dict[str, click.Command]:
    found: dict[str, click.Command] = {}
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        assert command is not None, name
        if isinstance(command, click.Group):
            found.update(leaves(command, (*prefix, name)))
        else:
            found[" ".join((*prefix, name))] = command
    return found


def rows() -> dict[str, str]:
    """Each documented command (the backticked text at the start of a table row, split
    on commas) with its row."""
    documented: dict[str, str] = {}
    for line in DOCS.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split(" | ")[0]
        for usage in re.findall(r"`([^`]+)`", first):
            words = []
            for word in usage.split():
                if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
                    break
                words.append(word)
            for length in range(len(words), 0, -1):
                documented.setdefault(" ".join(words[:length]), line)
    return documented


def test_every_command_is_documented_with_its_options() -> None:
    documented = rows()
    text = DOCS.read_text()
    problems = []
    for name, command in sorted(leaves(cli).items()):
        if name in ("serve", "completion"):  # each has a section of its own
            assert f"appliance {name}" in text
            continue
        row = documented.get(name)
        if row is None:
            problems.append(f"{name}: no row in docs/cli.md")
            continue
        for parameter in command.params:
            if not isinstance(parameter, click.Option):
                continue
            longs = [o for o in parameter.opts + parameter.secondary_opts if o.startswith("--")]
            if not longs or set(longs) & SHARED:
                continue
            if not any(option in row for option in longs):
                problems.append(f"{name}: {longs[0]} is not in its row")
    assert not problems, "\n".join(problems)


def test_every_documented_command_exists() -> None:
    commands = leaves(cli)
    groups = {name.split()[0] for name in commands}
    for usage in rows():
        words = usage.split()
        if usage in commands:
            continue
        subcommands = {name.split()[-1] for name in commands if " " in name}
        if words[0] not in groups:
            # a row naming an unknown group with a known command after it: a typo
            assert len(words) < 2 or words[1] not in subcommands, \
                f"docs/cli.md documents '{usage}': no group '{words[0]}'"
            continue
        if len(words) < 2:
            continue
        if any(name.startswith(usage + " ") for name in commands):
            continue  # a group named with its first words
        raise AssertionError(f"docs/cli.md documents '{usage}', which does not exist")
