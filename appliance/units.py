"""Parsing and printing byte sizes.

Sizes are written as a number with an optional unit. ``K``, ``M``, ``G``, ``T`` and ``P`` (and
their ``Ki``/``KiB`` spellings) are binary multiples: ``4K`` is 4096 bytes and ``1G`` is 2**30,
because block devices are sized in powers of two and an operator typing ``--size 1G`` means a
gibibyte. ``KB``, ``MB``, ``GB``, ``TB`` and ``PB`` are decimal (SI) multiples. A bare number
is bytes; ``B`` is accepted as a suffix of bytes.
"""

from __future__ import annotations

import re

from appliance.errors import InvalidArgument

_BINARY = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_DECIMAL = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15}
_SIZE = re.compile(r"(?P<number>[0-9]+)\s*(?P<unit>[A-Za-z]*)")


def parse_size(text: str) -> int:
    """Return the number of bytes *text* denotes, or raise :class:`InvalidArgument`."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise InvalidArgument(f"invalid size {text!r}: expected a number with an optional unit "
                              "such as 512, 4K, 64M, 1G or 1GiB")
    number = int(match["number"])
    unit = match["unit"].upper()
    if unit in _DECIMAL:
        return number * _DECIMAL[unit]
    for suffix in ("IB", "I"):
        if unit.endswith(suffix) and unit[: -len(suffix)] in _BINARY and unit[: -len(suffix)]:
            unit = unit[: -len(suffix)]
            break
    if unit not in _BINARY:
        raise InvalidArgument(f"invalid size {text!r}: unknown unit {match['unit']!r}")
    return number * _BINARY[unit]


def format_size(size: int) -> str:
    """Print *size* bytes in binary units: exactly when the largest unit that fits says it
    with two decimals at most (``1.5 GiB``), or a smaller one does (``1025 MiB``, not
    ``1 GiB``); else briefly (``1.2 GiB``)."""
    return _format(size)[0]


def format_size_exact(size: int) -> str:
    """:func:`format_size`, with the byte count added when that rounds (a size an operator
    asked for, or a change of size, must never look like another)."""
    text, exact = _format(size)
    return text if exact else f"{text} ({size} bytes)"


def _format(size: int) -> tuple[str, bool]:
    """The text of *size*, and whether it says the size exactly."""
    if size < 1024:
        return f"{size} B", True
    units = ("KiB", "MiB", "GiB", "TiB", "PiB")
    for power in range(len(units), 0, -1):
        scale = 1024**power
        # exact, and short: at most four digits before the point (1025 MiB, not 264212084 KiB)
        if scale <= size < 10000 * scale and (size * 100) % scale == 0:
            text = f"{size / scale:.2f}".rstrip("0").removesuffix(".")
            return f"{text} {units[power - 1]}", True
    value = float(size)
    for unit in units:
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f}".removesuffix(".0") + f" {unit}", False
    raise AssertionError("unreachable")
