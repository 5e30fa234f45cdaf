"""Secret files: 0600, complete or absent, never replaced; refused when others can read."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest

from appliance.errors import FailedPrecondition, InvalidArgument, NotFound
from appliance.secrets import read_secret_file, write_secret_file


def test_written_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "s"
    write_secret_file(path, b"0123456789abcdef0123")
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_secret_file(path) == b"0123456789abcdef0123"
    with pytest.raises(FileExistsError):
        write_secret_file(path, b"another secret value")
    assert read_secret_file(path) == b"0123456789abcdef0123"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary left


def test_concurrent_writers_one_wins_readers_see_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "race"
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        with contextlib.suppress(FileExistsError):
            write_secret_file(path, f"{index:02d}".encode() * 32)
        try:
            seen.append(read_secret_file(path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert len(set(seen)) == 1 and len(seen[0]) == 64


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        read_secret_file(tmp_path / "absent")
    loose = tmp_path / "loose"
    loose.write_bytes(b"0123456789abcdef")
    os.chmod(loose, 0o644)
    with pytest.raises(FailedPrecondition, match="0644"):
        read_secret_file(loose)
    short = tmp_path / "short"
    write_secret_file(short, b"tiny")
    with pytest.raises(InvalidArgument, match="16 to"):
        read_secret_file(short)
