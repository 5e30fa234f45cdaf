"""Running every check: side by side (the slow ones wait on subprocesses and the network),
reported in a fixed order, a check that crashes reported as a failure naming the error."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from appliance.defaults import API_LISTEN
from appliance.hostcheck import clock, cluster, disks, interpreter, kernel, multipath, packages
from appliance.hostcheck import ports as port_checks
from appliance.hostcheck.result import DEFAULT_CONFIG, Result, Settings, fail, ok, warn

Check = Callable[[Settings], list[Result]]


def check_config(settings: Settings) -> list[Result]:
    source = str(settings.config_file) if settings.config_file else \
        f"the defaults ({DEFAULT_CONFIG} does not exist)"
    if settings.listen_configured:
        return [ok("config", f"read {source}")]
    return [warn("config", f"read {source}, which has no listen: the API address checked "
                           f"is the default {API_LISTEN}, but appliance serve --config "
                           f"{settings.config_file} refuses to start without --listen",
                 f"add listen = \"{API_LISTEN}\" to {settings.config_file}")]


def check_privileges(settings: Settings) -> list[Result]:
    if os.geteuid() == 0:
        return [ok("privileges", "running as root, as the node daemon does")]
    return [warn("privileges", f"running as uid {os.geteuid()}: the node daemon runs as root "
                               "(mounts, loop devices), and some checks may fail here only "
                               "for want of it",
                 "run appliance check as root")]


#: (group, check), in the order of the report
CHECKS: tuple[tuple[str, Check], ...] = (
    ("config", check_config),
    ("privileges", check_privileges),
    ("kernel", kernel.check_devices),
    ("kernel", kernel.check_modules),
    ("packages", packages.check_packages),
    ("python", interpreter.check_interpreter),
    ("disk", disks.check_disks),
    ("ports", port_checks.check_api_port),
    ("ports", port_checks.check_replica_ports),
    ("ports", port_checks.check_iscsi_portal),
    ("clock", clock.check_clock),
    ("multipath", multipath.check_multipath),
    ("cluster", cluster.check_etcd),
    ("cluster", cluster.check_cluster_key),
)


def run_check(group: str, check: Check, settings: Settings) -> list[Result]:
    """*check*'s results; a check that raises is one failure naming the error."""
    try:
        return check(settings)
    except Exception as exc:  # one broken check must not hide the others
        return [fail(group, f"the check {check.__name__} failed: "
                            f"{type(exc).__name__}: {exc}",
                     "report this: a check should not fail itself")]


def run_checks(settings: Settings,
               checks: tuple[tuple[str, Check], ...] = CHECKS) -> list[Result]:
    """Every check's results, in the order of *checks*."""
    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        futures = [pool.submit(run_check, group, check, settings) for group, check in checks]
        return [result for future in futures for result in future.result()]
