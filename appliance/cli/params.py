"""Click parameter types shared by the commands."""

from __future__ import annotations

from typing import Any

import click

from appliance.errors import InvalidArgument
from appliance.replication.protocol import parse_address
from appliance.units import parse_size


class SizeType(click.ParamType[int, Any]):
    """A byte size such as ``512``, ``4K``, ``64M``, ``1G`` or ``1GiB``."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except InvalidArgument as exc:
            self.fail(exc.message, param, ctx)


class LabelType(click.ParamType[tuple[str, str], Any]):
    """A ``KEY=VALUE`` pair."""

    name = "key=value"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        key, sep, text = str(value).partition("=")
        if not sep or not key:
            self.fail(f"{value!r} is not of the form KEY=VALUE", param, ctx)
        return key, text


SIZE = SizeType()
LABEL = LabelType()

output_option = click.option(
    "-o", "--output", "output", type=click.Choice(["table", "json"]), default="table",
    show_default=True, help="Output format.")


class AddressType(click.ParamType[tuple[str, int], Any]):
    """``HOST:PORT``."""

    name = "host:port"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_address(str(value))
        except InvalidArgument as exc:
            self.fail(exc.message, param, ctx)


ADDRESS = AddressType()
