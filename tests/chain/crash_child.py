"""Replica layouts and operations for the crash-injection tests.

Run as ``python -m tests.chain.crash_child DIR OPERATION N``: opens the replica in DIR,
performs OPERATION and kills the process with SIGKILL at the Nth crash point (never when N
is 0, in which case it prints how many crash points it passed).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from appliance.chain import Replica, durable, purge

from .helpers import BS, pattern

SIZE = 64 * BS


def _chain(replica: Replica, layers: list[tuple[str, int, int, int]]) -> None:
    """Write ``(snapshot name, seed, first block, block count)`` layers in order."""
    for name, seed, first, count in layers:
        replica.write(pattern(seed, count * BS), first * BS)
        replica.snapshot(name)


def build_basic(replica: Replica) -> None:
    _chain(replica, [("s1", 1, 0, 40), ("s2", 2, 10, 20)])
    replica.write(pattern(3, 5 * BS + 100), 30 * BS + 7)
    replica.compute_checksum("s2")


def build_coalesce_into_child(replica: Replica) -> None:
    _chain(replica, [("s1", 1, 0, 4), ("p", 2, 0, 12), ("c", 3, 20, 40)])
    replica.write(pattern(4, BS), 0)
    replica.remove_snapshot("p")


def build_coalesce_into_parent(replica: Replica) -> None:
    _chain(replica, [("s1", 1, 0, 4), ("p", 2, 0, 40), ("c", 3, 20, 12), ("d", 5, 0, 1)])
    replica.remove_snapshot("p")


def build_prune(replica: Replica) -> None:
    _chain(replica, [("s1", 1, 0, 4), ("old", 2, 0, 24)])
    replica.write(pattern(3, 24 * BS), 0)
    replica.remove_snapshot("old")


def build_delete_leaf(replica: Replica) -> None:
    _chain(replica, [("s1", 1, 0, 8), ("leaf", 2, 4, 8)])
    replica.revert("s1")
    replica.remove_snapshot("leaf")


def build_many(replica: Replica) -> None:
    _chain(replica, [(f"s{n}", n, n * 6, 9) for n in range(7)])
    replica.write(pattern(99, 3 * BS), 2 * BS)
    for name in ("s0", "s2", "s3", "s6"):
        replica.remove_snapshot(name)


BUILDERS: dict[str, Callable[[Replica], None]] = {
    "basic": build_basic, "coalesce-into-child": build_coalesce_into_child,
    "coalesce-into-parent": build_coalesce_into_parent, "prune": build_prune,
    "delete-leaf": build_delete_leaf, "many": build_many,
}

#: operation name -> (layout, operation)
OPERATIONS: dict[str, tuple[str, Callable[[Replica], object]]] = {
    "snapshot": ("basic", lambda r: r.snapshot("new", labels={"k": "v"})),
    "revert": ("basic", lambda r: r.revert("s1")),
    "expand": ("basic", lambda r: r.expand(SIZE + 16 * BS)),
    "remove": ("basic", lambda r: r.remove_snapshot("s2")),
    "checksum": ("basic", lambda r: r.compute_checksum("s1")),
    "purge-coalesce-into-child": ("coalesce-into-child", lambda r: r.purge()),
    "purge-coalesce-into-parent": ("coalesce-into-parent", lambda r: r.purge()),
    "purge-prune": ("prune", lambda r: r.purge()),
    "purge-delete-leaf": ("delete-leaf", lambda r: r.purge()),
    "purge-many": ("many", lambda r: r.purge()),
}


def build(path: Path, layout: str) -> None:
    with Replica.create(path, SIZE) as replica:
        BUILDERS[layout](replica)


def main() -> None:
    path, operation, target = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    purge.STEP_BLOCKS = 8  # several copy steps even in a small replica
    passed: list[str] = []

    def hook(label: str) -> None:
        passed.append(label)
        if len(passed) == target:
            os.kill(os.getpid(), signal.SIGKILL)

    durable.set_crash_hook(hook)
    with Replica.open(path) as replica:
        OPERATIONS[operation][1](replica)
    print(len(passed))


if __name__ == "__main__":
    main()
