"""The node's TCP ports: its API's, and the range its replica servers take ports from."""

from __future__ import annotations

import errno
import socket

from appliance import ports
from appliance.hostcheck import processes
from appliance.hostcheck.result import Result, Settings, fail, ok, warn
from appliance.replication.protocol import format_address

#: fewer free ports than this in the replica range fails: replicas could not be placed
MIN_FREE_REPLICA_PORTS = 16


def address_problem(host: str) -> str:
    """Why nothing can listen on *host* here ("" when something can)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            return f"{host} cannot be listened on: {exc.strerror}"
    return ""


def appliance_holders(port: int) -> dict[int, str]:
    """The appliance's processes listening on *port*, each with its role."""
    found = {}
    for pid in ports.listeners([port]).get(port, set()):
        role = processes.appliance_role(pid)
        if role:
            found[pid] = role
    return found


def check_api_port(settings: Settings) -> list[Result]:
    host, port = settings.config.listen
    address = format_address((host, port))
    name = "ports/api"
    problem = address_problem(host)
    if problem:
        return [fail(name, f"the API address {address}: {problem}",
                     "set listen in the node's config (or --listen) to an address of this "
                     "machine")]
    if ports.bindable(host, port):
        return [ok(name, f"the API address {address} is free")]
    ours = appliance_holders(port)
    if "the node daemon" in ours.values():
        pid = next(p for p, role in ours.items() if role == "the node daemon")
        return [ok(name, f"the API address {address} is held by the node daemon itself "
                         f"(process {pid}): it is running")]
    return [fail(name, f"the API port {port} is taken by {ports.holder(port)}: the node "
                       f"daemon cannot listen on {address}",
                 "stop that program, or give the node another port (listen in the node's "
                 "config, or appliance serve --listen)")]


def check_replica_ports(settings: Settings) -> list[Result]:
    config = settings.config
    host, candidates = config.replica_address, config.replica_ports
    span = f"{host}:{candidates[0]}-{candidates[-1]}"
    name = "ports/replicas"
    problem = address_problem(host)
    if problem:
        return [fail(name, f"replica servers listen on {span}: {problem}",
                     "set replica_address (or --advertise) to an address of this machine")]
    held = [port for port in candidates if not ports.bindable(host, port)]
    owners = ports.listeners(held)
    ours, others = 0, []
    for port in held:
        pids = owners.get(port, set())
        if any(processes.appliance_role(pid) for pid in pids):
            ours += 1
        else:
            who = ", ".join(map(ports.describe, sorted(pids))) or "a program not seen"
            others.append(f"{port} ({who})")
    free = len(candidates) - len(held)
    detail = (f"{span}: {free} of {len(candidates)} free, {ours} held by the appliance's "
              f"processes, {len(others)} by other programs")
    if others:
        detail += ": " + ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
    remedy = "widen port_range in the node's config, or stop the programs holding its ports"
    if free < MIN_FREE_REPLICA_PORTS:
        return [fail(name, f"{detail}; fewer than {MIN_FREE_REPLICA_PORTS} free: new replicas "
                           "cannot get a port", remedy)]
    if others:
        return [warn(name, f"{detail}; the node moves replicas off ports other programs take",
                     remedy)]
    return [ok(name, detail)]


def check_iscsi_portal(settings: Settings) -> list[Result]:
    """The portal the node's own tgtd listens on for the iSCSI frontend (only needed when a
    volume is exported over iSCSI: a warning, not a failure)."""
    host, port = settings.config.portal
    address = format_address((host, port))
    name = "ports/iscsi"
    problem = address_problem(host)
    if problem:
        return [warn(name, f"the iSCSI portal {address}: {problem}",
                     "set iscsi_portal in the node's config to HOST:PORT of this machine")]
    if ports.bindable(host, port):
        return [ok(name, f"the iSCSI portal {address} is free")]
    commands = [processes.command_line(pid) for pid in ports.listeners([port]).get(port, ())]
    if any(argv and argv[0].endswith("tgtd") and f"portal={address}" in argv
           for argv in commands):
        return [ok(name, f"the iSCSI portal {address} is held by a tgtd for it")]
    return [warn(name, f"the iSCSI portal {address} is taken by {ports.holder(port)}: "
                       "volumes cannot be exported over iSCSI (--frontend iscsi)",
                 "the node runs its own tgtd: stop the machine's tgt service "
                 "(systemctl disable --now tgt), or set iscsi_portal in the node's config "
                 "to another HOST:PORT")]
