"""The whole client CLI at an interactive terminal (a pseudo-terminal: progress output
and bars are drawn) and through pipes, against a real daemon: every command an operator
walks through exits as it should, never with a traceback, and a drawn progress bar ends
at 100 %."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import APPLIANCE, Node

READ_TIMEOUT = 600.0


def at_terminal(node: Node, *args: str) -> tuple[int, str]:
    """Run the CLI with stdin, stdout and stderr on a pseudo-terminal; its status and
    everything it printed."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "APPLIANCE_URL": node.url,
           "APPLIANCE_TOKEN_FILE": str(node.token_file), "COLUMNS": "100"}
    process = subprocess.Popen([APPLIANCE, *args], stdin=terminal, stdout=terminal,
                               stderr=terminal, env=env, start_new_session=True)
    os.close(terminal)
    output = bytearray()
    deadline = time.monotonic() + READ_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        status = process.wait(timeout=60)
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
    return status, output.decode(errors="replace")


def through_pipes(node: Node, *args: str) -> tuple[int, str]:
    result = subprocess.run([APPLIANCE, *args, "--url", node.url, "--token-file",
                             str(node.token_file)] if args[0] not in ("completion",)
                            else [APPLIANCE, *args], capture_output=True, text=True,
                            timeout=READ_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    return result.returncode, result.stdout + result.stderr


def walk(tmp_path: Path, suffix: str) -> list[tuple[int, list[str]]]:
    """An operator's walk through the CLI: (expected status, command)."""
    target = tmp_path / f"backups{suffix}"
    target.mkdir()
    v, c = f"walk{suffix}", f"walkc{suffix}"
    return [
        (0, ["disk", "list"]),
        (0, ["volume", "create", v, "--size", "64M"]),
        (0, ["volume", "list"]),
        (0, ["volume", "attach", v]),
        (0, ["volume", "show", v]),
        (0, ["snapshot", "create", v, "first"]),
        (0, ["snapshot", "list", v]),
        (0, ["volume", "clone", v, c, "--snapshot", "first"]),
        (0, ["volume", "expand", v, "--size", "96M"]),
        (0, ["backup-target", "set", f"file://{target}"]),
        (0, ["backup-target", "show"]),
        (0, ["backup", "create", v]),
        (0, ["backup", "list"]),
        (0, ["events", "--volume", v]),
        (0, ["event", "list"]),
        (2, ["volume", "create", "bad/name", "--size", "1M"]),
        (3, ["volume", "show", "nope"]),
        (1, ["volume", "clone", v, "toomany", "--replicas", "3"]),
        (0, ["volume", "detach", v]),
        (0, ["volume", "delete", c]),
        (3, ["volume", "show", f"walkr{suffix}"]),  # not restored yet
        (0, ["volume", "delete", v]),
    ]


def _check(status: int, output: str, expected: int, command: list[str]) -> None:
    assert "Traceback" not in output, (command, output)
    assert status == expected, (command, status, output)
    bars = re.findall(r"\[(#*) *\] +(\d+)%", output)
    if bars:
        assert bars[-1][1] == "100", (command, output)  # a drawn bar ends full


# through pipes with -m slow (the suite's time budget): every command's output to a pipe
# is also checked by the CLI's own tests
@pytest.mark.parametrize("terminal", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["pty", "pipes"])
def test_cli_walk(node: Node, tmp_path: Path, terminal: bool) -> None:
    suffix = "t" if terminal else "p"
    backup_id = ""
    for expected, command in walk(tmp_path, suffix):
        status, output = (at_terminal if terminal else through_pipes)(node, *command)
        _check(status, output, expected, command)
        if command[:2] == ["backup", "create"]:
            backup_id = output.strip().splitlines()[-1].strip()
    assert backup_id.startswith("backup-"), backup_id
    restore = ["backup", "restore", backup_id, f"walkr{suffix}", "--replicas", "1"]
    status, output = (at_terminal if terminal else through_pipes)(node, *restore)
    _check(status, output, 0, restore)
    status, output = (at_terminal if terminal else through_pipes)(
        node, "volume", "delete", f"walkr{suffix}")
    _check(status, output, 0, ["volume", "delete"])
