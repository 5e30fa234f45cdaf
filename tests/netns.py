"""Test hosts: network namespaces joined to the root namespace by veth pairs on a bridge
(pyroute2), and partitions made with nftables drop rules inside a host.

Host *n* has address 10.77.0.(10+n)/24 on ``eth0``; the root namespace (where the engine
runs) is 10.77.0.1 on the bridge. A dropped packet is a real partition: connections time
out instead of being refused.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS, netns

SUBNET = "10.77.0"


@dataclass
class Host:
    name: str  # the network namespace
    address: str

    @property
    def launcher(self) -> list[str]:
        """A command prefix that runs a program in this host's network namespace (and no
        other namespace: its FUSE mounts are everyone's)."""
        return ["nsenter", f"--net=/run/netns/{self.name}", "--"]

    def partition(self, port: int | None = None, *, both_ways: bool = False) -> None:
        """Drop every packet arriving from the engine's side (or only for *port*); with
        *both_ways*, every packet leaving too (nothing this host sends arrives)."""
        rule = f"tcp dport {port} drop" if port else "drop"
        output = ("  chain output {\n    type filter hook output priority 0;\n"
                  "    oifname eth0 drop\n  }\n") if both_ways else ""
        script = ("table inet partition {\n  chain input {\n"
                  "    type filter hook input priority 0;\n"
                  f"    iifname eth0 {rule}\n  }}\n{output}}}\n")
        subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=script,
                       text=True, check=True)

    def kill_everything(self) -> None:
        """SIGKILL every process in this host's network namespace (a node that dies)."""
        listed = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                                text=True, check=False).stdout.split()
        for pid in listed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def heal(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, "nft", "delete", "table", "inet",
                        "partition"], check=False, capture_output=True)


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    tag = f"{os.getpid() % 10000}"
    bridge = f"aplbr{tag}"
    created: list[Host] = []
    ipr = IPRoute()
    try:
        ipr.link("add", ifname=bridge, kind="bridge")
        index = ipr.link_lookup(ifname=bridge)[0]
        ipr.addr("add", index=index, address=f"{SUBNET}.1", prefixlen=24)
        ipr.link("set", index=index, state="up")
        for number in range(count):
            name = f"apl{tag}h{number}"
            netns.create(name)
            created.append(Host(name, f"{SUBNET}.{10 + number}"))
            outside, inside = f"apl{tag}v{number}", f"apl{tag}p{number}"
            ipr.link("add", ifname=outside, kind="veth", peer={"ifname": inside})
            outer = ipr.link_lookup(ifname=outside)[0]
            ipr.link("set", index=outer, master=index, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname=inside)[0], net_ns_fd=name)
            with NetNS(name) as ns:
                peer = ns.link_lookup(ifname=inside)[0]
                ns.link("set", index=peer, ifname="eth0")
                ns.addr("add", index=peer, address=created[-1].address, prefixlen=24)
                ns.link("set", index=peer, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        yield created
    finally:
        for number, host in enumerate(created):
            for link in ipr.link_lookup(ifname=f"apl{tag}v{number}"):
                with contextlib.suppress(Exception):
                    ipr.link("del", index=link)
            with contextlib.suppress(Exception):
                netns.remove(host.name)
        with contextlib.suppress(Exception):
            ipr.link("del", index=ipr.link_lookup(ifname=bridge)[0])
        ipr.close()
        # pyroute2 (netlink/rt_files.py) abandons a generator over Path.iterdir(); collect it
        # here so its unclosed scandir iterator does not surface in a later test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
