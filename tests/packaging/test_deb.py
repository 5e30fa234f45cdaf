"""The appliance's Debian package: lintian, the unit's checks, and a life on one machine:
install, run (the web UI served from the installed files), upgrade with a volume attached
and written to (its engine keeps serving), removal refused while volumes are attached,
remove (data kept), purge (data still kept)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.harness import wait_for
from tests.packaging.conftest import Debs, installed_version
from tests.packaging.sandbox import Sandbox

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
UNIT = Path("/lib/systemd/system/appliance.service")
EXPOSURE = "5.9"  # systemd-analyze security of the unit; docs/packaging.md says why not lower
# the web UI's npm files, as build.sh takes them from appliance/ui/node_modules
UI_MODULES = Path("/usr/share/appliance/ui/node_modules")
UI_FILES = {"htmx.org/dist/htmx.min.js", "htmx.org/package.json", "htmx.org/LICENSE",
            "@picocss/pico/css/pico.min.css", "@picocss/pico/package.json",
            "@picocss/pico/LICENSE.md"}

# Writes 4 KiB blocks to DEVICE one at a time (O_DIRECT, fdatasync after each), numbering
# them, and logs each number once the write is acknowledged, until STOP exists; "verify"
# reads every block back and prints those that do not hold the last acknowledged write.
WRITER = r"""
import mmap, os, sys
mode, device, log, stop = sys.argv[1:5]
BLOCKS, SIZE = 1024, 4096
fd = os.open(device, os.O_RDWR | os.O_DIRECT)
buffer = mmap.mmap(-1, SIZE)
def content(number):
    return f"{number:016d}".encode() * (SIZE // 16)
if mode == "write":
    number = 0
    with open(log, "w") as out:
        while not os.path.exists(stop):
            buffer.seek(0)
            buffer.write(content(number))
            os.pwrite(fd, buffer, (number % BLOCKS) * SIZE)
            os.fdatasync(fd)
            out.write(f"{number}\n")
            out.flush()
            number += 1
else:
    acked = [int(line) for line in open(log)]
    last = {}
    for number in acked:
        last[number % BLOCKS] = number
    def read(block):
        os.preadv(fd, [buffer], block * SIZE)  # O_DIRECT: into the aligned buffer
        return buffer[:]
    bad = [block for block, number in last.items() if read(block) != content(number)]
    print(len(acked), len(bad), bad[:10])
"""

# GET PATH of the daemon's API on the sandbox's 127.0.0.1:9500, without a session: prints
# the status, the Content-Type and the body.
FETCH = r"""
import json, sys, urllib.error, urllib.request
try:
    answer = urllib.request.urlopen("http://127.0.0.1:9500" + sys.argv[1], timeout=30)
except urllib.error.HTTPError as error:
    answer = error
print(json.dumps({"status": answer.status, "type": answer.headers["Content-Type"],
                  "body": answer.read().decode()}))
"""


def sh(box: Sandbox, *argv: str, timeout: float = 600, **env: str,
       ) -> subprocess.CompletedProcess[str]:
    return box.run(list(argv), env={**ENV, **env}, timeout=timeout)


def ok(box: Sandbox, *argv: str, timeout: float = 600) -> str:
    result = sh(box, *argv, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stdout}{result.stderr}"
    return result.stdout


def daemon_pid(box: Sandbox) -> int | None:
    try:
        return int(box.path("/run/appliance/appliance.pid").read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """*pid* runs (a zombie that this machine's init has not reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def fetch(box: Sandbox, path: str) -> tuple[int, str, str]:
    """GET *path* of the sandbox's daemon: the status, the media type, the body."""
    got = json.loads(ok(box, "/usr/bin/python3", "-c", FETCH, path, timeout=60))
    return got["status"], got["type"].split(";")[0], got["body"]


def answers(box: Sandbox) -> bool:
    return sh(box, "appliance", "version", timeout=30).returncode == 0


def volume(box: Sandbox, name: str) -> dict[str, object]:
    return dict(json.loads(ok(box, "appliance", "volume", "show", name, "-o", "json")))


def engines(box: Sandbox) -> set[int]:
    pids = subprocess.run(["ip", "netns", "pids", box.host.name], capture_output=True,
                          text=True, check=True).stdout.split()
    found = set()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0] == b"nbdkit" and any(b"/opt/appliance/venv/" in arg for arg in argv):
            found.add(int(pid))
    return found


@pytest.mark.slow  # a minute of lintian (the suite's budget)
def test_lintian_is_clean(debs: Debs) -> None:
    result = subprocess.run(["lintian", "--tag-display-limit", "0", str(debs.first)],
                            capture_output=True, text=True, timeout=900, check=False)
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EWIXP]: ", line)]
    assert result.returncode == 0 and not tags, result.stdout + result.stderr


@pytest.mark.slow  # two minutes: a build and a sandbox install (the suite's budget)
def test_install_upgrade_remove_purge(debs: Debs, sandbox: Sandbox) -> None:
    ok(sandbox, "dpkg", "-i", str(debs.first))
    assert installed_version() == "0.1.0-1"
    # the package's files: the node's configuration in the sandbox's own /etc/appliance
    assert sandbox.path("/etc/appliance/node.toml").is_file()
    assert Path("/usr/bin/appliance").resolve() == Path("/opt/appliance/venv/bin/appliance")
    assert "appliance-volume-attach.1.gz" in {p.name for p in Path("/usr/share/man/man1").iterdir()}
    assert Path("/usr/share/appliance/kubernetes/04-node.yaml").is_file()
    # the web UI's npm files, and nothing else of node_modules (axe-core is the tests')
    assert {str(p.relative_to(UI_MODULES)) for p in UI_MODULES.rglob("*") if p.is_file()} \
        == UI_FILES
    # its templates and static files are the wheel's; node_modules is not
    (ui,) = Path("/opt/appliance/venv").glob("lib/python3*/site-packages/appliance/ui")
    assert (ui / "templates" / "login.html").is_file() and (ui / "static" / "app.js").is_file()
    assert not (ui / "node_modules").exists()
    verify = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True,
                            text=True, check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true",
                               f"--threshold={EXPOSURE.replace('.', '')}", str(UNIT)],
                              capture_output=True, text=True, check=False)
    assert security.returncode == 0, security.stdout[-600:]
    assert f"exposure level for appliance.service: {EXPOSURE}" in security.stdout

    # Started by postinst, or (this machine's policy-rc.d forbids services to start from
    # packages, as container images do) by the service command, as the Ansible role does.
    ok(sandbox, "service", "appliance", "start")
    wait_for(lambda: answers(sandbox), 60, "the packaged daemon to answer")
    checked = json.loads(sh(sandbox, "appliance", "check", "-o", "json").stdout)
    assert checked["ok"], checked
    # the web UI, from the installed files: the login page (the wheel's templates) and Pico
    # CSS (from /usr/share/appliance/ui/node_modules, the virtualenv having none)
    status, media, body = fetch(sandbox, "/ui/login")
    assert (status, media) == (200, "text/html"), f"{status} {media}: {body[:300]}"
    assert "Log in to appliance" in body and "/ui/assets/pico.css" in body
    status, media, body = fetch(sandbox, "/ui/assets/pico.css")
    assert (status, media) == (200, "text/css"), f"{status} {media}: {body[:300]}"
    pico = UI_MODULES / "@picocss/pico/css/pico.min.css"
    assert body.encode() == pico.read_bytes()
    ok(sandbox, "mkdir", "-p", "/var/lib/appliance/disk2")
    ok(sandbox, "appliance", "disk", "add", "/var/lib/appliance/disk2")
    ok(sandbox, "appliance", "volume", "create", "pkgvol", "--size", "64M", "--replicas", "2")
    device = ok(sandbox, "appliance", "volume", "attach", "pkgvol").strip()
    wait_for(lambda: volume(sandbox, "pkgvol")["robustness"] == "healthy", 120,
             "the volume to be healthy")
    engine = engines(sandbox)
    assert len(engine) == 1

    log, stop = sandbox.path("/var/log/appliance/writes"), sandbox.path("/run/appliance/stop")
    inside_log, inside_stop = "/var/log/appliance/writes", "/run/appliance/stop"
    writer = sandbox.popen(["/usr/bin/python3", "-c", WRITER, "write", device, inside_log,
                            inside_stop])
    try:
        wait_for(lambda: log.exists() and len(log.read_text().split()) > 50, 60,
                 "writes before the upgrade")
        before = daemon_pid(sandbox)
        # the upgrade: prerm stops the daemon, postinst starts it where policy lets it;
        # here (policy-rc.d forbids it) the operator's (or the role's) start does
        ok(sandbox, "dpkg", "-i", str(debs.newer))
        assert installed_version() == "0.1.0-2"
        assert before is not None and not alive(before), "the old daemon runs on new files"
        ok(sandbox, "service", "appliance", "start")
        wait_for(lambda: daemon_pid(sandbox) not in (None, before) and answers(sandbox), 60,
                 "the upgraded daemon")
        written = len(log.read_text().split())
        wait_for(lambda: len(log.read_text().split()) > written + 50, 60,
                 "writes after the upgrade")
        assert writer.poll() is None, "the writer stopped"
        assert engines(sandbox) == engine, "the engine was restarted by the upgrade"
        info = volume(sandbox, "pkgvol")
        assert (info["state"], info["robustness"]) == ("attached", "healthy"), info

        # removal is refused while a volume is attached, and changes nothing
        refused = sh(sandbox, "dpkg", "-r", "appliance")
        assert refused.returncode != 0
        assert "refusing to remove the package" in refused.stderr
        assert "engine" in refused.stderr and "appliance volume detach" in refused.stderr
        assert installed_version() == "0.1.0-2" and answers(sandbox)
    finally:
        stop.touch()
        writer.wait(timeout=60)
    count, bad, which = ok(sandbox, "/usr/bin/python3", "-c", WRITER, "verify", device,
                           inside_log, inside_stop).split(maxsplit=2)
    assert int(count) > 100 and int(bad) == 0, f"blocks without their last write: {which}"
    ok(sandbox, "appliance", "volume", "detach", "pkgvol")

    daemon = daemon_pid(sandbox)
    ok(sandbox, "dpkg", "-r", "appliance")
    assert installed_version() is None
    assert not Path("/opt/appliance").exists() and not Path("/usr/bin/appliance").exists()
    assert daemon is not None and not alive(daemon), "the daemon runs on without its files"
    data = sandbox.path("/var/lib/appliance")
    assert (data / "state.db").is_file() and (data / "token").is_file()
    replicas = list((data / "disk2").iterdir())
    assert replicas, "the volume's replica on the second disk is gone"
    assert sandbox.path("/etc/appliance/node.toml").is_file()  # a conffile stays until purge

    purged = sh(sandbox, "dpkg", "-P", "appliance")
    assert purged.returncode == 0, purged.stderr
    assert "/var/lib/appliance is kept" in purged.stderr
    assert not sandbox.path("/etc/appliance/node.toml").exists()
    assert not Path("/etc/init.d/appliance").exists()
    assert not list(Path("/etc").glob("rc?.d/*appliance"))
    assert (data / "state.db").is_file() and list((data / "disk2").iterdir()) == replicas
