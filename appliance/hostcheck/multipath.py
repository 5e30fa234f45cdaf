"""multipathd: it claims block devices it is not told to leave alone, and a volume's
filesystem on a claimed nbd or loop device then cannot be mounted ("already mounted or
busy"), a frequent failure of Longhorn nodes. Its blacklist must cover both."""

from __future__ import annotations

import re
from pathlib import Path

from appliance.hostcheck import processes
from appliance.hostcheck.result import Result, Settings, ok, warn

CONFIG = Path("/etc/multipath.conf")
STANZA = 'blacklist { devnode "^(nbd|loop)[0-9]+" }'
DEVICES = ("nbd0", "loop0")  # what the blacklist must match
DEVNODE = re.compile(r'^\s*devnode\s+"([^"]*)"', re.MULTILINE)


def blacklist_patterns(text: str) -> list[str]:
    """The devnode patterns of the ``blacklist`` sections of a multipath.conf (not of
    ``blacklist_exceptions``)."""
    text = re.sub(r"#.*", "", text)
    found = []
    for match in re.finditer(r"^\s*blacklist\s*\{", text, re.MULTILINE):
        depth, end = 1, match.end()
        while depth and end < len(text):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        found += DEVNODE.findall(text[match.end():end])
    return found


def uncovered(text: str) -> list[str]:
    """The devices of :data:`DEVICES` no blacklist pattern of *text* matches."""
    patterns = []
    for pattern in blacklist_patterns(text):
        try:
            patterns.append(re.compile(pattern))
        except re.error:
            continue
    return [device for device in DEVICES if not any(p.search(device) for p in patterns)]


def check_multipath(settings: Settings) -> list[Result]:
    name = "multipath"
    running = "multipathd" in processes.running_names()
    try:
        text: str | None = CONFIG.read_text()
    except FileNotFoundError:
        text = None
    if not running and text is None:
        return [ok(name, f"multipathd is not running and there is no {CONFIG}")]
    state = "multipathd is running" if running else "multipathd is not running"
    missing = list(DEVICES) if text is None else uncovered(text)
    if not missing:
        return [ok(name, f"{state}; the blacklist of {CONFIG} covers nbd and loop devices")]
    where = f"there is no {CONFIG}" if text is None else \
        f"the blacklist of {CONFIG} does not cover {' and '.join(missing)}"
    return [warn(name, f"{state} and {where}: multipathd may claim a volume's device, whose "
                       "filesystem then cannot be mounted",
                 f"add to {CONFIG}: {STANZA}, then systemctl restart multipathd")]
