"""What the node shows of a volume's history, and how it keeps a diverged branch.

Engines speak of replicas by address (``HOST:PORT``) and by replica id (the uuid in the
replica's directory); operators know them by their names (``VOLUME-ID``).
:class:`ReplicaNames` translates an engine's messages and reports into names.

A replica that a salvage kept (it holds a diverged branch: writes the served replica may
lack) becomes a detached volume of its own: :func:`keep_as_volume` rewrites its membership
record offline so that the new volume's engine serves it as its only member
(docs/membership.md, "Choosing between diverged replicas").

The functions that touch a replica directory block; the daemon runs them in threads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from appliance.chain import Replica
from appliance.chain.format import MAX_NAME_LENGTH
from appliance.control.objects import ReplicaRecord
from appliance.errors import ApplianceError
from appliance.replication import membership


class ReplicaNames:
    """Addresses and replica ids of the replicas in the store, to their names."""

    def __init__(self, replicas: Iterable[ReplicaRecord], host: str) -> None:
        self.names: dict[str, str] = {}
        for replica in replicas:
            self.names[replica.address(host)] = replica.name
            if replica.replica_id:
                self.names[replica.replica_id] = replica.name
        keys = sorted(self.names, key=len, reverse=True)
        # an address is not followed by a digit (port 1010 is not the start of port 10101)
        self._pattern = re.compile("|".join(re.escape(k) + r"(?!\d)" for k in keys)) \
            if keys else None

    def name(self, key: str | None) -> str | None:
        return self.names.get(key, key) if key else key

    def text(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda match: self.names[match.group(0)], text)

    def salvage(self, salvage: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """An engine's salvage report with replica names."""
        if not salvage:
            return None
        given_up = []
        for item in salvage.get("given_up") or []:
            named = dict(item)
            named["replica"] = self.name(item.get("replica")) or \
                self.name(item.get("replica_id"))
            if "why" in named:
                named["why"] = self.text(str(named["why"]))
            given_up.append(named)
        return {**salvage, "from": self.name(salvage.get("from")), "given_up": given_up}


def node_terms(message: str, volume: str) -> str:
    """An engine's advice in the node's terms: ``appliance volume salvage`` instead of the
    engine's ``--salvage`` and ``--salvage-from HOST:PORT``."""
    message = message.replace("--salvage-from HOST:PORT",
                              f"'appliance volume salvage {volume} --from REPLICA'")
    return re.sub(r"--salvage(?![-\w])", f"'appliance volume salvage {volume}'", message)


def one_line(message: str, log_file: Path | None = None) -> str:
    """A message on one line: an engine's refusal is; a failure that came with the end of
    its log keeps its first line and points to the log."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    first = lines[0].rstrip(":")
    return f"{first} (see {log_file})" if log_file else first


def describe_salvage(salvage: Mapping[str, Any]) -> str:
    """'salvaged at T from R; given up: ...' (names, as ReplicaNames.salvage gives)."""
    given_up = "; ".join(f"{item.get('replica') or item.get('replica_id')} ({item.get('why')})"
                         for item in salvage.get("given_up") or []) or "nothing known"
    return f"salvaged at {salvage.get('at')} from {salvage.get('from')} (generation " \
           f"{salvage.get('generation')}); given up: {given_up}"


def branch_volume_name(volume: str, branch: str, taken: set[str]) -> str:
    """``VOLUME-branch-ID`` (the first 8 hex digits of the branch), unique among *taken*,
    and short enough to be a volume name that still has room for a replica's suffix."""
    tail = f"-branch-{branch[:8]}"
    base = volume[:MAX_NAME_LENGTH - len(tail) - 12] + tail
    name, number = base, 1
    while name in taken:
        number += 1
        name = f"{base}-{number}"
    return name


def keep_as_volume(directory: Path, volume: str, new_volume: str) -> str:
    """Make the (stopped) replica in *directory*, kept from *volume* because it holds a
    diverged branch, the only member of *new_volume*: its record names the new volume and
    only itself, clean, with its history and one new branch saying why. Return its replica
    id. Done already (the record names *new_volume*): nothing changes."""
    with Replica.open(directory) as replica:
        raw = replica.volume_record()
        old = membership.Record.from_dict(raw) if raw else None
        if old is not None and old.volume == new_volume:
            return replica.replica_id
        history = old.history if old else ()
        since = f"diverged branch {old.branch[:8]}" if old else "no recorded history"
        kept = membership.Branch(membership.new_branch_id(), membership.now(),
                                 replica.generation,
                                 f"kept from volume {volume} ({since}) as volume {new_volume}")
        record = membership.Record(new_volume, (old.epoch if old else 0) + 1,
                                   (replica.replica_id,), True,
                                   (*history, kept)[-membership.MAX_HISTORY:],
                                   old.salvage if old else None)
        replica.set_volume_record(record.to_dict())
        replica.flush()
        return replica.replica_id


def read_replica_id(directory: Path) -> str | None:
    """The replica id in *directory*, or None when it cannot be read now (its server holds
    it, or it is gone)."""
    try:
        with Replica.open(directory, writable=False) as replica:
            return replica.replica_id
    except (ApplianceError, OSError):  # looked for again later
        return None
