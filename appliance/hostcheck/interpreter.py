"""nbdkit's Python: the engine is the appliance imported inside the interpreter that
nbdkit's Python plugin embeds, so that interpreter must be the version the appliance is
installed for, and must find the appliance."""

from __future__ import annotations

import shutil
import subprocess
import sys

from appliance.hostcheck.result import Result, Settings, fail, ok
from appliance.nbd.launch import PLUGIN, plugin_environment

NBDKIT = "nbdkit"
#: seconds loading the engine's plugin may take (it imports the appliance)
LOAD_TIMEOUT = 20.0
VENV_REMEDY = ("make the virtualenv from the interpreter nbdkit embeds (Debian: /usr/bin/python3 "
               "-m venv .venv, from python3-venv) and install the appliance in it again")


def dump_plugin(*plugin: str, timeout: float) -> tuple[dict[str, str], str]:
    """``nbdkit python [SCRIPT] --dump-plugin``: its ``key=value`` lines, and what went
    wrong ("" when it worked)."""
    command = [NBDKIT, "python", *plugin, "--dump-plugin"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env=plugin_environment(), check=False)
    except subprocess.TimeoutExpired:
        return {}, f"'{' '.join(command)}' did not finish within {timeout:.0f} s"
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return {}, f"'{' '.join(command)}' failed: " + " / ".join(lines[-3:])
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return values, ""


def version_problem(embedded: str, running: tuple[int, int]) -> str:
    """Why nbdkit's interpreter (version text *embedded*) cannot run the appliance installed
    for *running* (major, minor), or "" when it can."""
    parts = embedded.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return f"nbdkit's Python plugin reports python_version={embedded!r}"
    if (major, minor) != running:
        return (f"nbdkit's Python plugin embeds Python {major}.{minor}, the appliance is "
                f"installed for {running[0]}.{running[1]} ({sys.executable}): the engine "
                "imports the appliance inside nbdkit's interpreter, which cannot use packages "
                "built for another version")
    return ""


def check_interpreter(settings: Settings) -> list[Result]:
    name = "python/nbdkit"
    if shutil.which(NBDKIT) is None:
        return [fail(name, "nbdkit is not installed: the engine runs inside it",
                     "apt-get install nbdkit nbdkit-plugin-python")]
    values, problem = dump_plugin(timeout=settings.timeout * 3)
    if problem:
        return [fail(name, f"nbdkit's Python plugin cannot be loaded: {problem}",
                     "apt-get install nbdkit-plugin-python")]
    embedded = values.get("python_version", "")
    running = (sys.version_info.major, sys.version_info.minor)
    problem = version_problem(embedded, running)
    if problem:
        return [fail(name, problem, VENV_REMEDY)]
    results = [ok(name, f"nbdkit's Python plugin embeds Python {embedded}; the appliance runs "
                        f"on {'.'.join(map(str, sys.version_info[:3]))} ({sys.executable})")]
    _, problem = dump_plugin(str(PLUGIN), timeout=LOAD_TIMEOUT)
    if problem:
        results.append(fail("python/engine-plugin",
                            f"nbdkit cannot load the engine's plugin {PLUGIN}: {problem}",
                            VENV_REMEDY))
    else:
        results.append(ok("python/engine-plugin",
                          f"nbdkit's interpreter loads the engine's plugin, {PLUGIN}, "
                                                    "importing the appliance"))
    return results
