"""The snapshot-chain replica store: pure, synchronous, framework-free.

A replica is a directory holding one volume's chain of immutable snapshot layers and one
writable head (docs/replica-format.md). :class:`Replica` opens or creates one.
"""

from appliance.chain.directory import NotAReplica
from appliance.chain.format import BLOCK_SIZE, MAX_SIZE, MAX_SNAPSHOTS
from appliance.chain.reader import Extent, SnapshotReader
from appliance.chain.replica import LayerInfo, Replica

__all__ = ["BLOCK_SIZE", "MAX_SIZE", "MAX_SNAPSHOTS", "Extent", "LayerInfo", "NotAReplica",
           "Replica", "SnapshotReader"]
