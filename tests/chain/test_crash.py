"""Crash safety (DESIGN invariant 6): kill the process after every durable step of every
structure operation; the replica must reopen in the old or the new state, every byte intact.

A child process (tests/chain/crash_child.py) performs the operation and SIGKILLs itself at
the Nth crash point, for every N the operation passes. The parent then reopens the replica
(which completes or discards what the crash interrupted) and compares what a user can
observe with the state before the operation and the state after an uninterrupted run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.chain import Replica
from appliance.chain.check import check

from . import crash_child
from .helpers import visible_state

ROOT = Path(__file__).resolve().parents[2]


def run_child(path: Path, operation: str, target: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.chain.crash_child", str(path),
                           operation, str(target)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)


Tree = set[tuple[str | None, str | None, bool, bool]]


def tree(replica: Replica) -> Tree:
    return {(x.name, x.parent, x.removed, x.checksum is not None) for x in replica.layers()}


def observe(path: Path) -> tuple[dict[str, object], Tree]:
    with Replica.open(path) as replica:
        return visible_state(replica), tree(replica)


@pytest.mark.parametrize("operation", sorted(crash_child.OPERATIONS))
def test_crash_after_every_step(tmp_path: Path, operation: str) -> None:
    layout = crash_child.OPERATIONS[operation][0]
    reference = tmp_path / "reference"
    crash_child.build(reference, layout)
    old = observe(reference)
    finished = run_child(reference, operation, 0)
    assert finished.returncode == 0, finished.stderr
    steps = int(finished.stdout)
    assert steps >= 2, f"{operation} passed only {steps} crash points"
    new = observe(reference)
    assert new != old

    for target in range(1, steps + 1):
        path = tmp_path / f"crash-{target}"
        crash_child.build(path, layout)
        result = run_child(path, operation, target)
        assert result.returncode == -9, (target, result.stderr)
        state, shape = observe(path)  # reopening completes or discards the interrupted step
        if operation == "purge-many":
            # several purge steps, each atomic: what users see never changes (the kept
            # snapshots, their content and kept parents), and only removed layers go
            assert state == old[0] == new[0], target
            removed = {name for name, _parent, gone, _sum in shape if gone}
            assert removed <= {name for name, _parent, gone, _sum in old[1] if gone}, target
        else:
            assert (state, shape) in (old, new), f"crash at step {target} of {operation}"
        report = check(path)
        assert report.ok, (target, report.problems)
        if operation.startswith("purge"):
            with Replica.open(path) as replica:
                replica.purge()
            assert observe(path) == new, f"purge after a crash at step {target}"
