"""Running the Ansible roles of ansible/ against sandboxes (tests/packaging/sandbox.py):
the environment ansible-playbook needs, its PLAY RECAP, inventories."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import yaml

from tests.packaging.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
VENV_BIN = ROOT / ".venv" / "bin"
# the prerequisites without open-iscsi and nfs-common, which would upgrade this shared
# machine's systemd and bring udev (tests/packaging/test_ansible.py says why)
PREREQS = ["nbdkit", "nbdkit-plugin-python", "libnbd-bin", "fuse3", "qemu-utils", "xfsprogs",
           "e2fsprogs", "kmod"]
# The sandboxes reach no package registry (their network ends at the test bridge), and
# every package the roles ask for is on this machine already (./setup.sh): apt's lists are
# taken as fresh, however old, instead of refreshed.
OFFLINE_APT = {"appliance_prereqs_apt_cache_valid_time": 10 * 365 * 86400,
               "appliance_etcd_apt_cache_valid_time": 10 * 365 * 86400}
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+"
                   r"failed=(\d+)", re.MULTILINE)

Recap = dict[str, tuple[int, int, int, int]]


def ansible_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}


def recap(output: str) -> Recap:
    """PLAY RECAP per host: ok, changed, unreachable, failed."""
    return {host: (int(ok), int(changed), int(unreachable), int(failed))
            for host, ok, changed, unreachable, failed in RECAP.findall(output)}


def playbook(argv: Sequence[str], env: dict[str, str], box: Sandbox | None = None,
             playbook_file: str = "playbooks/site.yml") -> Recap:
    """Run ansible-playbook from ansible/ (in *box*, or here); its recap, checked clean."""
    command = ["env", "-C", str(ANSIBLE), str(VENV_BIN / "ansible-playbook"), *argv,
               playbook_file]
    if box is None:
        result = subprocess.run(command, capture_output=True, text=True, env=env,
                                timeout=1500, check=False)
    else:
        result = box.run(command, env=env, timeout=1500)
    summary = recap(result.stdout)
    assert result.returncode == 0 and summary, result.stdout[-6000:] + result.stderr[-3000:]
    assert all(unreachable == failed == 0 for _, _, unreachable, failed in summary.values())
    return summary


def local_inventory(path: Path, deb: Path) -> Path:
    """One node, "node", reached with a local connection, with a second disk."""
    path.write_text(yaml.safe_dump({"all": {
        "children": {"appliance_nodes": {"hosts": {"node": {
            "ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}}}},
        "vars": {**OFFLINE_APT, "appliance_node_deb": str(deb),
                 "appliance_prereqs_packages": PREREQS,
                 "appliance_node_disks": [{"path": "/var/lib/appliance/disk2",
                                           "tags": ["second"]}]}}}))
    return path


def write_inventory(path: Path, inventory: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(inventory))
    return path
