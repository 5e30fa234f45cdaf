"""Printing results: JSON for programs, aligned text for people. Data goes to stdout."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=False)]
    lines = []
    for row in [headers, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def emit(data: Any, output: str, render_table: Any) -> None:
    """Print *data* as JSON, YAML, or with *render_table* (a function of the data)."""
    if output == "json":
        emit_json(data)
    elif output == "yaml":
        import yaml  # noqa: PLC0415 - only when asked for

        click.echo(yaml.safe_dump(data, sort_keys=True).rstrip())
    else:
        click.echo(render_table(data))
