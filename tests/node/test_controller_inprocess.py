"""The volume controller in-process: a real SQLite store, a fake supervisor that simulates
the processes (and records what it was asked), and trio's autojump clock, so that waits of
minutes (the reconcile interval, ``replica_replenishment_wait``) take no real time.

Three things keep virtual time honest here:

* The controller runs its blocking calls (the store's, the supervisor's) in worker threads.
  With ``autojump_threshold=0`` the clock jumps to the next deadline whenever every task is
  blocked, threads in flight included, so a deadline pending while a thread runs is
  reached at once. The only one on the controller's paths is placement's ``statfs`` bound:
  the placement is made with no bound (``statfs_timeout=inf``).
* For the same reason the tests never wait with a deadline of their own (polling with
  ``trio.sleep`` made the clock race ahead of the controller while its threads ran, by
  thousands of virtual seconds on a loaded host): they wait on the store's watch and look
  again after each change. Virtual time then advances only through the controller's own
  wait between passes (``reconcile_interval``); a test that waits forever is ended by
  pytest's timeout.
* The controller stamps a failed replica with wall-clock time (kept in the store across
  restarts). The tests give it a wall clock that follows the virtual one, so the
  replenishment wait elapses in virtual time.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import trio
import trio.testing

from appliance.control.objects import Disk, ReplicaRecord, Settings, Volume
from appliance.control.sqlite_store import SQLiteStore
from appliance.node.config import NodeConfig
from appliance.node.controller import Controller
from appliance.node.placement import Placement
from appliance.node.supervisor import Supervisor

MiB = 1 << 20
DISKS = ("default", "second")


@dataclass(frozen=True)
class Call:
    """One request the controller made to the supervisor, and the (virtual) time of it."""

    method: str
    args: tuple[Any, ...]
    at: float


class FakeSupervisor:
    """The methods of :class:`~appliance.node.supervisor.Supervisor` the controller calls,
    on simulated processes: replica servers that run or not, engines with a mode per
    replica address, devices. Called from worker threads, hence the lock."""

    def __init__(self, config: NodeConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.servers: set[str] = set()  # names of the replicas whose server runs
        self.engines: dict[str, dict[str, Any]] = {}  # volume -> {"size", "modes"}
        self.devices: dict[str, str] = {}

    def record(self, method: str, *args: Any) -> None:
        with self.lock:
            self.calls.append(Call(method, args, self.clock()))

    def called(self, method: str) -> list[Call]:
        with self.lock:
            return [call for call in self.calls if call.method == method]

    def address(self, replica: ReplicaRecord) -> str:
        return f"{self.config.replica_address}:{replica.port}"

    def fail(self, volume: str, address: str) -> None:
        """The engine reports the replica at *address* out of service."""
        with self.lock:
            self.engines[volume]["modes"][address] = "ERR"

    # -- replicas -----------------------------------------------------------------------

    def secret_file(self, volume: str) -> Path:
        return self.config.secrets_dir / volume

    def create_replica_dir(self, replica: ReplicaRecord, size: int) -> str:
        self.record("create_replica_dir", replica.name, size)
        return f"id-{replica.name}"

    def replica_process_alive(self, replica: ReplicaRecord) -> bool:
        with self.lock:
            return replica.name in self.servers

    def replica_running(self, replica: ReplicaRecord) -> bool:
        return self.replica_process_alive(replica)

    def start_replica(self, replica: ReplicaRecord) -> None:
        self.record("start_replica", replica.name)
        with self.lock:
            self.servers.add(replica.name)

    def stop_replica(self, replica: ReplicaRecord) -> None:
        self.record("stop_replica", replica.name)
        with self.lock:
            self.servers.discard(replica.name)

    def delete_replica_dir(self, replica: ReplicaRecord) -> None:
        self.record("delete_replica_dir", replica.name)

    # -- engines ------------------------------------------------------------------------

    def engine_status(self, volume: str) -> dict[str, Any] | None:
        with self.lock:
            engine = self.engines.get(volume)
            if engine is None:
                return None
            modes = dict(engine["modes"])
        rw = sum(1 for mode in modes.values() if mode == "RW")
        state = "faulted" if not rw else "healthy" if rw == len(modes) else "degraded"
        return {"volume": volume, "size": engine["size"], "state": state, "branch": "b1",
                "started": {}, "salvage": None,
                "replicas": [{"address": address, "mode": mode}
                             for address, mode in modes.items()]}

    def start_engine(self, volume: Volume, replicas: list[ReplicaRecord], *,
                     salvage: bool = False, salvage_from: ReplicaRecord | None = None) -> None:
        self.record("start_engine", volume.name, tuple(r.name for r in replicas), salvage)
        with self.lock:  # a replica whose server does not run starts out of service
            self.engines[volume.name] = {"size": volume.size, "modes": {
                self.address(r): "RW" if r.name in self.servers else "ERR" for r in replicas}}

    def engine_log(self, volume: str) -> Path:
        return self.config.run_dir / volume / "ctl.sock.log"

    def stop_engine(self, volume: str) -> None:
        self.record("stop_engine", volume)
        with self.lock:
            self.engines.pop(volume, None)
            self.devices.pop(volume, None)

    def engine_call(self, volume: str, op: str, **arguments: Any) -> Any:
        self.record("engine_call", volume, op, arguments.get("address"))
        with self.lock:
            modes = self.engines[volume]["modes"]
            if op == "add-replica":
                modes[arguments["address"]] = "RW"  # rebuilt at once
            elif op == "remove-replica":
                modes.pop(arguments["address"], None)
        return {}

    # -- devices ------------------------------------------------------------------------

    def attached_device(self, volume: str) -> str | None:
        with self.lock:
            return self.devices.get(volume)

    def attach(self, volume: str, *, link: bool = True) -> str:
        self.record("attach", volume)
        with self.lock:
            self.devices[volume] = f"/dev/fake-{volume}"
            return self.devices[volume]

    def detach(self, volume: str) -> None:
        with self.lock:
            self.devices.pop(volume, None)

    def forget_volume(self, volume: str) -> None:
        self.record("forget_volume", volume)


@dataclass
class Running:
    controller: Controller
    store: SQLiteStore
    supervisor: FakeSupervisor

    async def volume(self, name: str) -> Volume:
        entry = await self.store.get(Volume.key_of(name))
        assert entry is not None, f"volume {name} is gone"
        return Volume.from_dict(entry.value)

    async def replicas(self, volume: str) -> list[ReplicaRecord]:
        return await self.controller.replicas_of(volume)

    async def replica(self, name: str) -> ReplicaRecord:
        entry = await self.store.get(ReplicaRecord.key_of(name))
        assert entry is not None, f"replica {name} is gone"
        return ReplicaRecord.from_dict(entry.value)

    async def create(self, name: str, replicas: int, *, attached: bool) -> None:
        volume = Volume(name, 64 * MiB, replicas, "2026-01-01T00:00:00Z", attached=attached)
        await self.store.put(volume.key, volume.to_dict(), expect=0)
        self.controller.poke()

    async def change(self, name: str, **spec: Any) -> None:
        await self.store.update(Volume.key_of(name), lambda value: replace(
            Volume.from_dict(value), **spec).to_dict())
        self.controller.poke()


def wall_clock_following(clock: trio.testing.MockClock) -> Callable[[], float]:
    """A wall clock that follows the virtual one (see the module); callable from worker
    threads too."""
    base = time.time()
    return lambda: base + clock.current_time()


@asynccontextmanager
async def running(root: Path, clock: trio.testing.MockClock) -> AsyncIterator[Running]:
    """A controller running its loop over a store with two disks, until the block ends;
    *clock* is the test's (pytest-trio runs a test on the clock fixture it asks for)."""
    wall_clock = wall_clock_following(clock)
    config = NodeConfig(data_dir=root, listen=("127.0.0.1", 0), node_name="test")
    store = await SQLiteStore.open(root / "state.db")
    try:
        for name in DISKS:  # one replica of a volume per disk
            (root / name).mkdir()
            await store.put(Disk.key_of(name), Disk(name, str(root / name)).to_dict())
        supervisor = FakeSupervisor(config, wall_clock)
        controller = Controller(store, cast(Supervisor, supervisor), config,
                                placement=Placement(store, config, statfs_timeout=math.inf),
                                wall_clock=wall_clock)
        async with trio.open_nursery() as nursery:
            await nursery.start(controller.run)
            yield Running(controller, store, supervisor)
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def until(run: Running, condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait until *condition* holds: looked at now and after every change to the store
    (each step of the controller writes one: a status, a replica record), with no deadline
    (see the module)."""
    _, revision = await run.store.list("/")
    async with run.store.watch("/", revision) as changes:
        if await condition():
            return
        async for _ in changes:
            if await condition():
                return


async def attached_and_healthy(run: Running, name: str) -> None:
    async def serving() -> bool:
        volume = await run.volume(name)
        return (volume.state, volume.robustness) == ("attached", "healthy")
    await until(run, serving)


async def test_an_attached_volume_gets_its_servers_engine_and_device(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path, autojump_clock) as run:
        await run.create("vol", 2, attached=True)
        await attached_and_healthy(run, "vol")
        sup = run.supervisor
        replicas = await run.replicas("vol")
        names = sorted(r.name for r in replicas)
        assert len(names) == 2 and len({r.port for r in replicas}) == 2
        assert {c.args[0] for c in sup.called("create_replica_dir")} == set(names)
        assert sorted(c.args[0] for c in sup.called("start_replica")) == names
        [engine] = sup.called("start_engine")
        assert engine.args[0] == "vol" and sorted(engine.args[1]) == names
        assert engine.args[2] is False  # never started with salvage unasked
        order = [c.method for c in sup.calls]  # servers first: the engine connects to them
        assert order.index("start_engine") > max(
            i for i, method in enumerate(order) if method == "start_replica")
        assert (await run.volume("vol")).device == "/dev/fake-vol"
        assert {r.replica_id for r in replicas} == {f"id-{name}" for name in names}


async def test_a_failed_replica_is_added_back_after_the_replenishment_wait(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    wait = 600.0
    async with running(tmp_path, autojump_clock) as run:
        await run.store.put(Settings.key_of("global"),
                            Settings(replica_replenishment_wait=wait).to_dict())
        await run.create("vol", 2, attached=True)
        await attached_and_healthy(run, "vol")
        victim = (await run.replicas("vol"))[1]
        address = run.supervisor.address(victim)
        started = trio.current_time()
        run.supervisor.fail("vol", address)
        run.controller.poke()

        async def marked_and_degraded() -> bool:
            replica = await run.replica(victim.name)
            volume = await run.volume("vol")
            return replica.failed_at is not None and volume.robustness == "degraded"
        await until(run, marked_and_degraded)
        failed_at = (await run.replica(victim.name)).failed_at
        assert failed_at is not None

        def added() -> list[Call]:
            return [c for c in run.supervisor.called("engine_call")
                    if c.args[1:] == ("add-replica", address)]

        async def rebuilt() -> bool:
            return bool(added())
        await until(run, rebuilt)  # the record of it written afterwards wakes the wait
        [call] = added()
        assert call.at >= failed_at + wait  # not before the wait...
        assert trio.current_time() - started >= wait  # ...of virtual seconds: no real wait
        await attached_and_healthy(run, "vol")
        assert (await run.replica(victim.name)).failed_at is None
        assert len(run.supervisor.called("start_engine")) == 1  # the engine kept serving


async def test_a_detached_volume_has_its_processes_stopped(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path, autojump_clock) as run:
        await run.create("vol", 2, attached=True)
        await attached_and_healthy(run, "vol")
        await run.change("vol", attached=False)

        async def detached() -> bool:
            volume = await run.volume("vol")
            return volume.state == "detached"
        await until(run, detached)
        sup = run.supervisor
        volume = await run.volume("vol")
        assert (volume.device, volume.robustness) == (None, "unknown")
        assert [c.args for c in sup.called("stop_engine")] == [("vol",)]
        names = sorted(r.name for r in await run.replicas("vol"))
        assert sorted(c.args[0] for c in sup.called("stop_replica")) == names
        assert not sup.servers and not sup.engines and not sup.devices


async def test_replicas_a_create_stores_meanwhile_are_not_placed_again(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # A create stores the volume, then its replicas one by one, under placement.lock. A
    # pass that counted the volume's replicas in between waits for the lock; once it has
    # it, the volume has them all, and it places none (it once placed the difference from
    # its count: a third replica, beside one it already had).
    async with running(tmp_path, autojump_clock) as run:
        placement = run.controller.placement
        volume = Volume("vol", 64 * MiB, 2, "2026-01-01T00:00:00Z")
        async with placement.lock:  # as NodeService.create_volume holds it
            planned = await placement.plan_replicas(volume, [], 2)
            await run.store.put(volume.key, volume.to_dict(), expect=0)
            await run.store.put(planned[0].key, planned[0].to_dict(), expect=0)
            run.controller.poke()
            while not placement.lock.statistics().tasks_waiting:  # it counted one
                await trio.sleep(0)
            await run.store.put(planned[1].key, planned[1].to_dict(), expect=0)

        async def detached() -> bool:
            return (await run.volume("vol")).state == "detached"
        await until(run, detached)
        assert sorted(r.name for r in await run.replicas("vol")) == \
            sorted(r.name for r in planned)
