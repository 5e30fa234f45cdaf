from __future__ import annotations

import pytest

from appliance.errors import InvalidArgument
from appliance.units import format_size, parse_size


@pytest.mark.parametrize(("text", "size"), [
    ("512", 512), ("4K", 4096), ("4k", 4096), ("64M", 64 << 20), ("1G", 1 << 30),
    ("1GiB", 1 << 30), ("1Gi", 1 << 30), ("2T", 2 << 40), ("10B", 10), ("1GB", 10**9),
    (" 8 MiB ", 8 << 20),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "1.5G", "1X", "G", "1 G B", "0x10", "1iB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match="size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(0) == "0 B"
    assert format_size(4096) == "4 KiB"
    assert format_size(1536 << 20) == "1.5 GiB"
    assert format_size(1025 << 20) == "1025 MiB"  # exact: not "1 GiB"
    assert format_size(16 << 40) == "16 TiB"
    assert format_size(12345678) == "11.8 MiB"  # no unit says it exactly: briefly
    assert format_size(264212084 << 10) == "252 GiB"  # exact only in KiB: too long
