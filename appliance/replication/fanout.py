"""One change applied to every replica of a volume, one replica at a time.

The policy, shared by the engine (snapshots and structure changes of a served volume) and
the node daemon (the same changes on the replica directories of a volume no engine serves):

* the change is applied to each replica in turn;
* an error of a *refusal* type (a bad name, a snapshot that already exists...) raised before
  any replica took the change is raised as it is: nothing changed anywhere, so the caller
  may report it as the user's mistake;
* any other failure, or any failure after a replica took the change, *demotes* that replica
  (the engine takes it out of service; offline, it is left behind to be rebuilt), and the
  change goes on with the others;
* the change fails only when no replica took it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from appliance.errors import ApplianceError, StorageIOError

Target = TypeVar("Target")
Result = TypeVar("Result")


def apply_to_each(what: str, targets: Iterable[Target], action: Callable[[Target], Result], *,
                  refusals: tuple[type[ApplianceError], ...],
                  demote: Callable[[Target, ApplianceError], None]) -> list[tuple[Target, Result]]:
    """Apply *action* to each of *targets* by the policy above; return the targets that
    took the change with their results. *what* names the change in the error raised when
    every target failed (``"{what} failed on every replica"``). The failed targets are
    demoted after the last target was tried, before anything is raised."""
    done: list[tuple[Target, Result]] = []
    failed: list[tuple[Target, ApplianceError]] = []
    for target in targets:
        try:
            done.append((target, action(target)))
        except ApplianceError as exc:
            if not done and isinstance(exc, refusals):
                raise  # refused before anything changed
            failed.append((target, exc))
    for target, error in failed:
        demote(target, error)
    if not done:
        raise StorageIOError(f"{what} failed on every replica")
    return done
