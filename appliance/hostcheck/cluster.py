"""A node of a cluster: its etcd members answer and are healthy (reached as the daemon
reaches them, with the configured TLS files), and the cluster's key is in place."""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

import httpx

from appliance.errors import ApplianceError, NotFound
from appliance.hostcheck.result import Result, Settings, fail, ok, warn
from appliance.node.config import NodeConfig
from appliance.secrets import read_secret_file


def tls_context(config: NodeConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(config.etcd_ca) if config.etcd_ca else None)
    if config.etcd_cert and config.etcd_key:
        context.load_cert_chain(str(config.etcd_cert), str(config.etcd_key))
    return context


def endpoint_problem(url: str, verify: ssl.SSLContext | bool, timeout: float) -> str:
    """Why the etcd member at *url* cannot serve the node ("" when it is healthy)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 2379
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    try:
        answer = httpx.get(url + "/health", timeout=timeout, verify=verify)
    except httpx.HTTPError as exc:
        return f"{url}/health: {exc or type(exc).__name__}"
    try:
        health = answer.json().get("health")
    except (ValueError, AttributeError):
        health = None
    if answer.status_code != 200 or health != "true":
        return (f"{url}/health answers {answer.status_code} {answer.text.strip()[:200]!r}: "
                "not a healthy etcd member (no leader?)")
    return ""


def check_etcd(settings: Settings) -> list[Result]:
    config = settings.config
    if not config.clustered:
        return []
    try:
        context: ssl.SSLContext | bool = tls_context(config)
    except (OSError, ssl.SSLError) as exc:
        return [fail("cluster/etcd", f"the TLS files for etcd cannot be loaded: {exc}",
                     "check etcd_ca, etcd_cert and etcd_key in the node's config")]
    results = []
    for url in config.cluster:
        name = f"cluster/etcd {url}"
        problem = endpoint_problem(url, context, settings.timeout)
        if problem:
            remedy = ("start etcd there, or correct cluster in the node's config "
                      "(etcd://HOST:PORT, etcds:// for TLS)")
            if url.startswith("https://"):
                remedy += "; with TLS, check etcd_ca, etcd_cert and etcd_key"
            results.append(fail(name, f"the etcd member {url}: {problem}: the node keeps "
                                      "its state there", remedy))
        else:
            results.append(ok(name, f"the etcd member {url} is healthy"))
    results.append(ok("cluster/nodes", "the other nodes are not checked from here: run "
                                       "appliance check on each"))
    return results


def check_cluster_key(settings: Settings) -> list[Result]:
    config = settings.config
    if not config.clustered:
        return []
    name, path = "cluster/key", config.key_file
    try:
        read_secret_file(path)
    except NotFound:
        return [warn(name, f"the cluster key {path} does not exist: the first node of a new "
                           "cluster creates it, every other node refuses to start without it",
                     f"when joining a cluster, copy {path.name} from a node of it to {path} "
                     "(mode 0600)")]
    except ApplianceError as exc:
        return [fail(name, f"the cluster key: {exc.message}",
                     f"copy the cluster's key from a node of it to {path}, mode 0600 "
                     f"(chmod 600 {path})")]
    return [ok(name, f"the cluster key {path} is there, mode 0600")]
