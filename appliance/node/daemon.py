"""``appliance serve``: the node daemon.

One trio nursery runs the state store's background work, the controller and the HTTP
server. Stopping the daemon (SIGTERM, SIGINT) stops only these: engines and replica
servers keep serving, and are adopted again at the next start (RELIABILITY row 13).
"""

from __future__ import annotations

import hmac
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as serve_http

from appliance.control import cluster
from appliance.control.etcd_store import EtcdStore
from appliance.control.objects import Disk
from appliance.control.sqlite_store import SQLiteStore
from appliance.control.store import StateStore
from appliance.errors import Conflict, FailedPrecondition
from appliance.node.api import create_app
from appliance.node.backupjobs import BackupJobs
from appliance.node.backups import BackupService, BackupTarget
from appliance.node.browse import BrowseService
from appliance.node.config import NodeConfig
from appliance.node.controller import Controller
from appliance.node.metrics import Metrics
from appliance.node.placement import Placement
from appliance.node.recurring import ApiActions, RecurringJobs
from appliance.node.scrubs import ScrubService
from appliance.node.service import NodeService
from appliance.node.standby import StandbyService
from appliance.node.supervisor import Supervisor
from appliance.replication.protocol import format_address
from appliance.secrets import write_secret_file

log = logging.getLogger(__name__)
CLUSTER_KEY = "/cluster"


def prepare_data_dir(config: NodeConfig) -> str:
    """Blocking: make the data directory (mode 0700) if it is missing; the API token."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return ensure_token(config)


async def open_store(config: NodeConfig) -> tuple[StateStore, bytes | None]:
    """The state store (SQLite, or etcd for a cluster) and, in a cluster, its key: a node
    started with another cluster's key, or without the key of an existing cluster, is
    refused before it changes anything."""
    if not config.clustered:
        return await SQLiteStore.open(config.state_db), None
    cert = (str(config.etcd_cert), str(config.etcd_key)) \
        if config.etcd_cert and config.etcd_key else None
    store = await EtcdStore.open(list(config.cluster), ca=str(config.etcd_ca)
                                 if config.etcd_ca else None, cert=cert)
    try:
        key = await trio.to_thread.run_sync(cluster_key, config,
                                            await store.get(CLUSTER_KEY) is None)
        check = {"key_check": cluster.key_check(key)}
        try:
            await store.put(CLUSTER_KEY, {**check, "created": time.time()}, expect=0)
            log.info("a new cluster: its key is in %s (copy it to every node that joins)",
                     config.key_file)
        except Conflict:
            entry = await store.get(CLUSTER_KEY)
            if entry is None or not hmac.compare_digest(
                    str(entry.value.get("key_check")), check["key_check"]):
                raise FailedPrecondition(
                    f"cluster key file {config.key_file} is not the key of the cluster at "
                    f"{','.join(config.cluster)}: copy the key file of a node of that "
                    "cluster") from None
    except BaseException:
        await store.aclose()
        raise
    return store, key


def cluster_key(config: NodeConfig, new_cluster: bool) -> bytes:
    """Blocking: the cluster key (made, mode 0600, for the first node of a new cluster)."""
    if new_cluster and not config.key_file.exists():
        return cluster.create_key(config.key_file)
    return cluster.read_key(config.key_file)


def write_token(config: NodeConfig, token: str) -> None:
    """Blocking: the cluster's API token in DATA_DIR/token (0600), the same on every node."""
    path = config.token_file
    if path.exists() and path.read_text().strip() == token:
        return
    path.unlink(missing_ok=True)
    write_secret_file(path, token.encode() + b"\n")


def ensure_token(config: NodeConfig) -> str:
    """The API token, created (mode 0600) at the first start."""
    path = config.token_file
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as file:
        file.write(os.urandom(32).hex() + "\n")
    return path.read_text().strip()


@dataclass
class Protection:
    """Continuous protection: recurring jobs, scrubs, browse mounts, standby volumes."""

    recurring: RecurringJobs
    scrubs: ScrubService
    browse: BrowseService
    standby: StandbyService

    @classmethod
    def make(cls, store: StateStore, service: NodeService, target: BackupTarget,
             config: NodeConfig, token: str) -> Protection:
        membership = service.controller.membership
        events = service.controller.events
        return cls(RecurringJobs(store, ApiActions(config.local_api_url, token), events,
                                 is_leader=lambda: membership.is_leader),
                   ScrubService(store, service),
                   BrowseService(store, service, target, config, events),
                   StandbyService(store, service, target))

    def runners(self) -> list[Any]:
        return [self.browse.run, self.recurring.run, self.scrubs.run, self.standby.run]


async def run_daemon(config: NodeConfig,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    os.umask(0o077)  # the database, its journal, runtime files: the daemon's only
    token = await trio.to_thread.run_sync(prepare_data_dir, config)
    store, key = await open_store(config)
    if key is not None:
        token = cluster.api_token(key)
        await trio.to_thread.run_sync(write_token, config, token)
    try:
        supervisor = Supervisor(config)
        placement = Placement(store, config)
        target = BackupTarget(store, config.secrets_dir)
        controller = Controller(store, supervisor, config, placement=placement,
                                restorer=target.restore_into, cluster_key=key)
        jobs = BackupJobs(store)
        membership = controller.membership
        await membership.join()
        service = NodeService(store, controller, backup_jobs=jobs)
        backups = BackupService(store, service, target, jobs)
        if not [e for e in (await store.list(Disk.PREFIX))[0]
                if placement.mine(Disk.from_dict(e.value).node)]:
            await trio.to_thread.run_sync(partial(config.default_disk.mkdir, parents=True,
                                                  exist_ok=True))
            await service.add_disk(str(config.default_disk), [])
        metrics = Metrics(store, supervisor, config, placement=placement, backup_jobs=jobs,
                          membership=membership)
        protection = Protection.make(store, service, target, config, token)
        backups.completed = protection.standby.notice
        app = create_app(service, backups, protection.recurring, protection.scrubs,
                         protection.browse, protection.standby, token, metrics.render)
        http = HypercornConfig()
        http.bind = [format_address(config.listen)]
        http.accesslog = None
        http.errorlog = logging.getLogger("hypercorn")
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run)
            await nursery.start(membership.run)
            await nursery.start(controller.run)
            await nursery.start(backups.run)
            for runner in protection.runners():
                await nursery.start(runner)
            await nursery.start(partial(serve_http, app, http,  # type: ignore[arg-type]
                                        shutdown_trigger=shutdown.wait))
            log.info("node %s serving the API on %s (data in %s)", config.node_name,
                     format_address(config.listen), config.data_dir)
            task_status.started()
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    log.info("stopping (engines and replica servers keep running)")
                    shutdown.set()
                    with trio.move_on_after(5):
                        await membership.leave()
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


def main(config: NodeConfig) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request to etcd
    trio.run(run_daemon, config)
