"""What ``appliance csi`` was started with, parsed once at the edge and passed down."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PluginConfig:
    node_id: str  # this node's name in the appliance
    wait: float = 120.0  # the longest a call waits on the daemon (attach, copy, delete)
