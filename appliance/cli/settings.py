"""``appliance settings``: the node daemon's settings (``GET``/``PATCH /v1/settings``), with
each one's type, default and description as the daemon defines them
(``GET /v1/settings/definitions``)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import click

from appliance.cli.client import ApiClient, api, client_options
from appliance.cli.output import emit, table
from appliance.errors import FailedPrecondition, InvalidArgument

OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]),
                      default="table", show_default=True, help="Output format.")
TRUE = frozenset({"true", "yes", "on", "1"})
FALSE = frozenset({"false", "no", "off", "0"})


def parse_value(name: str, text: str, kind: str) -> bool | int | float | str:
    """*text* as a value of setting *name*, of type *kind* (bool, int, float or str)."""
    word = text.strip().lower()
    value: bool | int | float | None = None
    if kind == "bool":
        value = word in TRUE if word in TRUE | FALSE else None
        wanted = "true or false (or yes/no, on/off, 1/0)"
    elif kind == "int":
        with contextlib.suppress(ValueError):
            value = int(word)
        wanted = "an integer"
    elif kind == "float":
        with contextlib.suppress(ValueError):
            value = float(word)
        value = value if value is not None and math.isfinite(value) else None
        wanted = "a number"
    else:
        return text
    if value is None:
        raise InvalidArgument(f"invalid value {text!r} for setting {name}: must be {wanted}")
    return value


def show(value: Any) -> str:
    """A setting's value as ``settings set`` takes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return "-" if value is None else str(value)


def current(client: ApiClient) -> dict[str, Any]:
    """The daemon's settings by name."""
    values: dict[str, Any] = client.call("GET", "/v1/settings")
    values.pop("name", None)  # the record's key, not a setting
    return values


def definitions(client: ApiClient) -> dict[str, dict[str, Any]]:
    """Each setting's ``type``, ``default`` and ``description`` by name; none from a
    daemon older than the route."""
    try:
        found = client.call("GET", "/v1/settings/definitions")
    except FailedPrecondition:  # "no route": an older daemon
        return {}
    return {item["name"]: item for item in found}


def known(values: dict[str, Any], name: str) -> None:
    """Refuse *name* unless it is one of the daemon's settings, naming them."""
    if name not in values:
        raise InvalidArgument(f"unknown setting {name!r}; the settings are: "
                              + ", ".join(sorted(values)))


def kind_of(value: Any, definition: dict[str, Any] | None) -> str:
    """The type of a setting: as the daemon defines it, else that of its value."""
    if definition and definition.get("type") in ("bool", "int", "float", "str"):
        return str(definition["type"])
    return {bool: "bool", int: "int", float: "float"}.get(type(value), "str")


@click.group()
def settings() -> None:
    """The node's settings: list, get, set."""


@settings.command("list")
@OUTPUT
@client_options
def settings_list(output: str, url: str, token_file: Path) -> None:
    """Every setting with its value, its default and what it does."""
    client = api(url, token_file)
    values = current(client)
    defined = definitions(client)
    rows = [{"name": name, "value": value,
             "default": defined.get(name, {}).get("default"),
             "description": defined.get(name, {}).get("description", "")}
            for name, value in sorted(values.items())]
    emit(rows, output, lambda items: table(
        [[x["name"], show(x["value"]), show(x["default"]), x["description"]] for x in items],
        ["NAME", "VALUE", "DEFAULT", "DESCRIPTION"]))


@settings.command("get")
@click.argument("name")
@client_options
def settings_get(name: str, url: str, token_file: Path) -> None:
    """Print the value of setting NAME."""
    values = current(api(url, token_file))
    known(values, name)
    click.echo(show(values[name]))


@settings.command("set")
@click.argument("name")
@click.argument("value")
@client_options
def settings_set(name: str, value: str, url: str, token_file: Path) -> None:
    """Set setting NAME to VALUE (true/false, yes/no, on/off or 1/0 for a switch), and
    print the old and the new value."""
    client = api(url, token_file)
    values = current(client)
    known(values, name)
    parsed = parse_value(name, value, kind_of(values[name], definitions(client).get(name)))
    updated = client.call("PATCH", "/v1/settings", {name: parsed})
    old, new = show(values[name]), show(updated[name])
    click.echo(f"{name}: already {new}" if old == new else f"{name}: {old} -> {new}")
