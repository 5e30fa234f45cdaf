"""Operations on the replicas of a volume that no engine serves, done by the daemon on the
replica directories themselves; and copying a snapshot's content into new replicas (clone).

An offline change is applied to every replica in turn. Each replica that took it gets a
revision above every replica's old one, so when the change failed half-way the replicas
that did not take it are behind and the engine rebuilds them at the next attach (the
membership rules, appliance/replication/membership.py). Every directory is opened before
anything changes: a replica that cannot be opened refuses the whole change.

Blocking; the daemon runs these in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from appliance.chain import BLOCK_SIZE, Replica
from appliance.chain.source import LayerSource, LocalSource, ancestry
from appliance.errors import ApplianceError, FailedPrecondition
from appliance.replication import fanout, membership

log = logging.getLogger(__name__)
PIECE = 1 << 20


@contextlib.contextmanager
def _opened(directories: list[Path], *, writable: bool) -> Iterator[list[Replica]]:
    with contextlib.ExitStack() as stack:
        replicas = []
        for directory in directories:
            try:
                replicas.append(stack.enter_context(Replica.open(directory,
                                                                      writable=writable)))
            except ApplianceError as exc:
                raise FailedPrecondition(f"replica {directory} cannot be opened: {exc}") \
                    from exc
        yield replicas


def change(directories: list[Path], what: str,
           action: Callable[[Replica], Any]) -> list[Any]:
    """Apply *action* to every replica (the policy of appliance/replication/fanout.py: any
    error before a replica took the change refuses it); raise if it failed everywhere."""
    def left_behind(replica: Replica, exc: ApplianceError) -> None:
        log.warning("%s failed on replica %s (it will be rebuilt): %s", what, replica.path,
                    exc)

    with _opened(directories, writable=True) as replicas:
        newest = max(r.revision for r in replicas)
        done = fanout.apply_to_each(what, replicas, action, refusals=(ApplianceError,),
                                    demote=left_behind)
        for replica, _ in done:
            replica.set_revision(newest + 1)
            replica.flush()
        return [result for _, result in done]


def layers(directories: list[Path]) -> list[dict[str, Any]]:
    """The layers of the most recent replica, parents first."""
    with _opened(directories, writable=False) as replicas:
        best = max(replicas, key=lambda r: r.revision)
        return [layer.as_dict() for layer in best.layers()]


# -- copying a snapshot ---------------------------------------------------------------------


@contextlib.contextmanager
def local_source(directories: list[Path]) -> Iterator[LocalSource]:
    with _opened(directories, writable=False) as replicas:
        yield LocalSource(max(replicas, key=lambda r: r.revision))


def copy_snapshot(source: LayerSource, snapshot: str, volume: str, targets: list[Path],
                  progress: Callable[[int, int], None] = lambda done, total: None) -> int:
    """Write the content of *snapshot* into the new, empty replicas *targets* of volume
    *volume*, and mark them as equal members; return the bytes copied."""
    chain = ancestry(source.layers(), snapshot)
    runs = [(layer["name"], first * BLOCK_SIZE, end * BLOCK_SIZE) for layer in chain
            for first, end in source.layer_extents(layer["name"])]
    total = sum(end - start for _, start, end in runs)
    done = 0
    buffer = memoryview(bytearray(PIECE))
    with _opened(targets, writable=True) as replicas:
        size = chain[-1]["size"]
        for replica in replicas:
            if replica.size != size:
                replica.expand(size)
        for name, start, end in runs:
            for offset in range(start, end, PIECE):
                piece = buffer[:min(PIECE, end - offset)]
                source.read_layer(name, piece, offset)
                for replica in replicas:
                    replica.write(piece, offset)
                done += len(piece)
                progress(done, total)
        mark_equal(volume, replicas, f"cloned from snapshot {snapshot}")
    return done


def mark_equal(volume: str, replicas: list[Replica], cause: str) -> None:
    """Record that the new replicas *replicas* of *volume*, written with the same data,
    are equal: one revision and a clean membership record naming them all, so the first
    engine serves from every one of them (instead of rebuilding all but one)."""
    revision = max(r.revision for r in replicas)
    record = membership.initial_record(volume, [r.replica_id for r in replicas], cause)
    for replica in replicas:
        replica.set_revision(revision)
        replica.set_volume_record(record)
        replica.flush()
