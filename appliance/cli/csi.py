"""``appliance csi``: the CSI plugin for Kubernetes (docs/kubernetes.md)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import click

from appliance.cli.client import api, client_options


@click.command()
@click.option("--endpoint", required=True, envvar="CSI_ENDPOINT", show_envvar=True,
              metavar="unix:///PATH", help="The unix socket to serve CSI on.")
@click.option("--node-id", required=True, envvar="NODE_ID", show_envvar=True,
              help="This node's name in the appliance (its daemon's node name).")
@click.option("--mode", type=click.Choice(["controller", "node", "all"]), default="all",
              show_default=True, help="The services to serve (Identity always).")
@click.option("--wait", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="The longest a call waits for the daemon (attach, copy, delete); the "
                   "caller retries after that.")
@client_options
def csi(endpoint: str, node_id: str, mode: str, wait: float, url: str,
        token_file: Path) -> None:
    """Serve the CSI plugin (Identity, Controller, Node) for the node daemon at --url."""
    from appliance.csi import server  # noqa: PLC0415 - gRPC only for this command
    from appliance.csi.backend import Appliance  # noqa: PLC0415
    from appliance.csi.config import PluginConfig  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()

    def stopping(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    server.serve(Appliance(api(url, token_file)), PluginConfig(node_id, wait), endpoint,
                 mode, stop)
