"""``appliance serve``: the node daemon.

One trio nursery runs the state store's background work, the controller and the HTTP
server. Stopping the daemon (SIGTERM, SIGINT) stops only these: engines and replica
servers keep serving, and are adopted again at the next start (RELIABILITY row 13).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as serve_http

from appliance.control.objects import Disk
from appliance.control.sqlite_store import SQLiteStore
from appliance.node.api import create_app
from appliance.node.backupjobs import BackupJobs
from appliance.node.backups import BackupService, BackupTarget
from appliance.node.config import NodeConfig
from appliance.node.controller import Controller
from appliance.node.metrics import Metrics
from appliance.node.placement import Placement
from appliance.node.service import NodeService
from appliance.node.supervisor import Supervisor
from appliance.replication.protocol import format_address

log = logging.getLogger(__name__)


def prepare_data_dir(config: NodeConfig) -> str:
    """Blocking: make the data directory (mode 0700) if it is missing; the API token."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return ensure_token(config)


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


async def run_daemon(config: NodeConfig,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    os.umask(0o077)  # the database, its journal, runtime files: the daemon's only
    token = await trio.to_thread.run_sync(prepare_data_dir, config)
    store = await SQLiteStore.open(config.state_db)
    try:
        supervisor = Supervisor(config)
        placement = Placement(store, config)
        target = BackupTarget(store, config.secrets_dir)
        controller = Controller(store, supervisor, config, placement=placement,
                                restorer=target.restore_into)
        jobs = BackupJobs(store)
        service = NodeService(store, controller, backup_jobs=jobs)
        backups = BackupService(store, service, target, jobs)
        if not (await store.list(Disk.PREFIX))[0]:
            await trio.to_thread.run_sync(partial(config.default_disk.mkdir, parents=True,
                                                  exist_ok=True))
            await service.add_disk(str(config.default_disk), [])
        metrics = Metrics(store, supervisor, config, placement=placement, backup_jobs=jobs)
        app = create_app(service, backups, token, metrics.render)
        http = HypercornConfig()
        http.bind = [format_address(config.listen)]
        http.accesslog = None
        http.errorlog = logging.getLogger("hypercorn")
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run)
            await nursery.start(controller.run)
            await nursery.start(backups.run)
            await nursery.start(partial(serve_http, app, http,  # type: ignore[arg-type]
                                        shutdown_trigger=shutdown.wait))
            log.info("node %s serving the API on %s (data in %s)", config.node_name,
                     format_address(config.listen), config.data_dir)
            task_status.started()
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    log.info("stopping (engines and replica servers keep running)")
                    shutdown.set()
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


def main(config: NodeConfig) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trio.run(run_daemon, config)
