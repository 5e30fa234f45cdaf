"""Random sequences of every operation against a simple in-memory model of a snapshot chain.

The model keeps each snapshot's full content as bytes and the tree as parent links; it
knows nothing of layers, indexes or files. After every step the head and every surviving
snapshot of the real replica must equal the model, byte for byte.

The one place the model needs the tree is unmap: discarded blocks read as they do in the
nearest kept snapshot below the head (passing removed snapshots that nothing else needs).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from appliance.chain import Replica

from .helpers import BS, pattern, snapshot_bytes

INITIAL_BLOCKS = 6


@dataclass
class SnapshotModel:
    content: bytes
    parent: str | None
    removed: bool = False


@dataclass
class ChainModel:
    size: int
    head: bytearray
    head_parent: str | None = None
    snapshots: dict[str, SnapshotModel] = field(default_factory=dict)

    def children(self, name: str) -> int:
        count = sum(1 for s in self.snapshots.values() if s.parent == name)
        return count + (self.head_parent == name)

    def unmap_source(self) -> bytes:
        """What discarded head blocks read as."""
        name = self.head_parent
        while name is not None:
            snap = self.snapshots[name]
            if not snap.removed or self.children(name) != 1:
                return snap.content
            name = snap.parent
        return b""

    def purge(self) -> None:
        changed = True
        while changed:
            changed = False
            for name, snap in list(self.snapshots.items()):
                if not snap.removed:
                    continue
                kids = [k for k, s in self.snapshots.items() if s.parent == name]
                if not kids and self.head_parent != name:
                    del self.snapshots[name]
                    changed = True
                elif len(kids) == 1 and self.head_parent != name:
                    self.snapshots[kids[0]].parent = snap.parent
                    del self.snapshots[name]
                    changed = True

    def kept_parent(self, name: str | None) -> str | None:
        while name is not None and self.snapshots[name].removed:
            name = self.snapshots[name].parent
        return name


offsets = st.integers(min_value=0, max_value=1 << 30)
lengths = st.integers(min_value=1, max_value=INITIAL_BLOCKS * BS)


class ReplicaMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="model-"))
        size = INITIAL_BLOCKS * BS
        self.replica = Replica.create(self.directory / "r", size)
        self.model = ChainModel(size, bytearray(size))
        self.counter = 0

    def teardown(self) -> None:
        self.replica.close()
        shutil.rmtree(self.directory)

    def _range(self, offset: int, length: int) -> tuple[int, int]:
        offset %= self.model.size
        return offset, min(length, self.model.size - offset)

    # -- data ---------------------------------------------------------------------------

    @rule(offset=offsets, length=lengths, seed=st.integers(0, 1 << 16))
    def write(self, offset: int, length: int, seed: int) -> None:
        offset, length = self._range(offset, length)
        data = pattern(seed, length)
        self.replica.write(data, offset)
        self.model.head[offset: offset + length] = data

    @rule(offset=offsets, length=lengths)
    def write_zeroes(self, offset: int, length: int) -> None:
        offset, length = self._range(offset, length)
        self.replica.write_zeroes(offset, length)
        self.model.head[offset: offset + length] = bytes(length)

    @rule(offset=offsets, length=lengths)
    def unmap(self, offset: int, length: int) -> None:
        offset, length = self._range(offset, length)
        source = self.model.unmap_source()
        self.replica.unmap(offset, length)
        first, last = -(-offset // BS), (offset + length) // BS
        for block in range(first, last):
            start = block * BS
            below = source[start: start + BS]
            self.model.head[start: start + BS] = below + bytes(BS - len(below))

    @rule()
    def flush(self) -> None:
        self.replica.flush()

    # -- structure ----------------------------------------------------------------------

    @rule()
    def snapshot(self) -> None:
        name = f"s{self.counter}"
        self.counter += 1
        self.replica.snapshot(name)
        self.model.snapshots[name] = SnapshotModel(bytes(self.model.head), self.model.head_parent)
        self.model.head_parent = name

    def _kept(self) -> list[str]:
        return sorted(n for n, s in self.model.snapshots.items() if not s.removed)

    @precondition(lambda self: self._kept())
    @rule(data=st.data())
    def revert(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._kept()))
        self.replica.revert(name)
        content = self.model.snapshots[name].content
        self.model.head = bytearray(content + bytes(self.model.size - len(content)))
        self.model.head_parent = name

    @precondition(lambda self: self._kept())
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._kept()))
        self.replica.remove_snapshot(name)
        self.model.snapshots[name].removed = True

    @rule()
    def purge(self) -> None:
        self.replica.purge()
        self.model.purge()
        # What purge leaves: removed layers that two children need, or that the head
        # still reads through. (Which removed layers remain is not observable otherwise:
        # the store may drop a pruned layer the model keeps.)
        layers = self.replica.layers()
        for layer in layers:
            if layer.removed:
                assert len(layer.children) >= 2 or layer.children == (None,), layer

    @rule(blocks=st.integers(1, 6))
    def expand(self, blocks: int) -> None:
        self.replica.expand(self.model.size + blocks * BS)
        self.model.size += blocks * BS
        self.model.head += bytes(blocks * BS)

    @rule()
    def reopen(self) -> None:
        self.replica.close()
        self.replica = Replica.open(self.directory / "r")

    # -- checks -------------------------------------------------------------------------

    @invariant()
    def contents_match(self) -> None:
        replica, model = self.replica, self.model
        assert replica.size == model.size
        assert replica.read(0, model.size) == bytes(model.head)
        layers = {x.name: x for x in replica.layers()}
        kept = {n for n, x in layers.items() if n is not None and not x.removed}
        assert kept == set(self._kept())
        for name in kept:
            assert snapshot_bytes(replica, name) == model.snapshots[name].content, name

    @invariant()
    def tree_matches(self) -> None:
        layers = {x.name: x for x in self.replica.layers()}

        def kept_parent(name: str | None) -> str | None:
            while name is not None and layers[name].removed:
                name = layers[name].parent
            return name

        assert kept_parent(layers[None].parent) == self.model.kept_parent(self.model.head_parent)
        for name in self._kept():
            expected = self.model.kept_parent(self.model.snapshots[name].parent)
            assert kept_parent(layers[name].parent) == expected


ReplicaMachine.TestCase.settings = settings(max_examples=250, stateful_step_count=50,
                                            deadline=None)
TestReplicaModel = ReplicaMachine.TestCase
