"""The CLI's token file and URL, against a real daemon: each problem is named with the file
or URL and what to do, with the exit status of bad input (2), or 1 for a token file that
others can read (refused, like every secret file: whoever reads it controls the node)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Node, free_port, run


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    running = Node(tmp_path_factory.mktemp("client"))
    running.start()
    try:
        yield running
    finally:
        running.cleanup()


def empty(node: Node, tmp_path: Path) -> Path:
    path = tmp_path / "empty-token"
    path.touch(mode=0o600)
    return path


def directory(node: Node, tmp_path: Path) -> Path:
    path = tmp_path / "a-directory"
    path.mkdir()
    return path


def readable_by_others(node: Node, tmp_path: Path) -> Path:
    path = tmp_path / "token-0644"
    shutil.copyfile(node.token_file, path)
    path.chmod(0o644)
    return path


def not_a_token(node: Node, tmp_path: Path) -> Path:
    path = tmp_path / "two-lines"
    path.write_bytes(b"first line\nsecond\n")
    path.chmod(0o600)
    return path


TOKEN_FILES: list[tuple[Callable[[Node, Path], Path], int, str]] = [
    (empty, 2, "is empty: the node daemon writes its token to DATA_DIR/token"),
    (directory, 2, "is a directory, not a file"),
    (readable_by_others, 1, "can be read by others (mode 0644)"),
    (not_a_token, 2, "does not hold an API token"),
]


@pytest.mark.parametrize(("make", "status", "message"), TOKEN_FILES,
                         ids=[make.__name__ for make, _, _ in TOKEN_FILES])
def test_token_file_problems_are_named(node: Node, tmp_path: Path,
                                       make: Callable[[Node, Path], Path], status: int,
                                       message: str) -> None:
    token_file = make(node, tmp_path)
    result = run("volume", "list", "--url", node.url, "--token-file", token_file, check=False)
    assert result.returncode == status, result.stderr
    assert result.stderr.startswith(f"error: token file {token_file} "), result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "header" not in result.stderr


def test_the_data_directory_as_token_file_points_to_the_token(node: Node) -> None:
    result = run("volume", "list", "--url", node.url, "--token-file", node.data, check=False)
    assert result.returncode == 2, result.stderr
    assert f"give {node.data / 'token'}" in result.stderr, result.stderr


def test_a_loose_token_file_is_refused_with_what_to_do(node: Node, tmp_path: Path) -> None:
    token_file = readable_by_others(node, tmp_path)
    refused = run("volume", "list", "--url", node.url, "--token-file", token_file,
                  check=False)
    assert f"chmod 600 {token_file}" in refused.stderr, refused.stderr
    token_file.chmod(0o600)
    run("volume", "list", "--url", node.url, "--token-file", token_file)


URLS: list[tuple[str, int, str]] = [
    ("{url}/foo", 2, "{url}/foo does not look like the appliance API: GET {url}/foo/v1/volumes "
                     "answered HTTP 404"),
    ("{url}/healthz", 2, "does not look like the appliance API"),
    ("127.0.0.1:{port}", 2, "is not the http:// or https:// address of the appliance API"),
    ("http://127.0.0.1:{free}", 1, "cannot reach the appliance API at http://127.0.0.1:{free}"),
]


@pytest.mark.parametrize(("url", "status", "message"), URLS, ids=[u for u, _, _ in URLS])
def test_url_problems_are_named(node: Node, url: str, status: int, message: str) -> None:
    values = {"url": node.url, "port": node.port, "free": free_port()}
    result = run("volume", "list", "--url", url.format(**values), "--token-file",
                 node.token_file, check=False)
    assert result.returncode == status, result.stderr
    assert message.format(**values) in result.stderr, result.stderr


def test_a_missing_object_is_still_not_found(node: Node) -> None:
    result = run("volume", "show", "nope", "--url", node.url, "--token-file", node.token_file,
                 check=False)
    assert result.returncode == 3 and "volume 'nope' does not exist" in result.stderr
