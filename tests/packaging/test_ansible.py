"""The Ansible roles (ansible/): ansible-lint's production profile; a converge of site.yml
on one machine with a local connection (the package installed, the daemon started and
healthy, `appliance check` passing), then again with nothing changed; and a converge over
SSH of three machines into an etcd cluster with TLS and three nodes joined as one cluster,
on which a 3-replica volume is placed on the three nodes.

The machines are sandboxes (tests/packaging/sandbox.py): network namespaces with private
configuration, data, runtime and log directories, sharing this machine's /opt, /usr and
dpkg database. What that means here: the package is installed once for all of them (the
first host to take dpkg's lock installs it, the others find that version installed or
install it again), so the three-host converge proves three configurations, daemons, etcd
members and joins, not three installations; and open-iscsi and nfs-common, which would
upgrade this machine's systemd and bring udev, are left out of the prerequisites here
(their installation is an apt task like the others).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.harness import wait_for
from tests.netns import hosts
from tests.packaging.conftest import Debs, purge
from tests.packaging.converge import (
    ANSIBLE,
    OFFLINE_APT,
    PREREQS,
    VENV_BIN,
    ansible_env,
    local_inventory,
    playbook,
    write_inventory,
)
from tests.packaging.sandbox import Sandbox, sandboxes, start_sshd


def test_ansible_lint_production_profile_finds_nothing(tmp_path: Path) -> None:
    result = subprocess.run([str(VENV_BIN / "ansible-lint"), "--profile", "production",
                             "--offline", "--nocolor"], cwd=ANSIBLE,
                            env=ansible_env(tmp_path / "home"), capture_output=True,
                            text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Passed: 0 failure(s), 0 warning(s)" in output, output[-3000:]


@pytest.mark.slow  # two minutes: a whole converge and a second one (the suite's budget)
def test_converge_one_node_locally_then_nothing_changes(debs: Debs, sandbox: Sandbox,
                                                       tmp_path: Path) -> None:
    inventory = local_inventory(tmp_path / "local.yml", debs.first)
    env = ansible_env(tmp_path / "home")
    first = playbook(["-i", str(inventory)], env, sandbox)
    assert first["node"][1] > 0, first

    version = json.loads(sandbox.run(["appliance", "version", "-o", "json"]).stdout)
    assert version["daemon"] == version["client"], version
    disks = json.loads(sandbox.run(["appliance", "disk", "list", "-o", "json"]).stdout)
    assert any(disk["path"] == "/var/lib/appliance/disk2" and disk["tags"] == ["second"]
               for disk in disks), disks
    checked = json.loads(sandbox.run(["appliance", "check", "-o", "json"]).stdout)
    assert checked["ok"], checked
    token = sandbox.path("/var/lib/appliance/token")
    assert token.stat().st_mode & 0o777 == 0o600

    again = playbook(["-i", str(inventory)], env, sandbox)
    assert again["node"][1] == 0, again


@pytest.mark.slow
def test_converge_three_nodes_over_ssh_into_one_cluster(debs: Debs, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with hosts(3) as made, sandboxes(made, tmp_path / "hosts") as boxes:
        purge(boxes[0])
        try:
            converge_three(boxes, key, debs, tmp_path)
        finally:
            purge(boxes[0])


def converge_three(boxes: list[Sandbox], key: Path, debs: Debs, tmp_path: Path) -> None:
    for box in boxes:
        start_sshd(box, (tmp_path / "id_ed25519.pub").read_text())
    names = {f"node{number + 1}": box for number, box in enumerate(boxes)}
    members = {name: {"ansible_host": box.address, "appliance_etcd_address": box.address,
                      "appliance_node_address": box.address}
               for name, box in names.items()}
    inventory = write_inventory(tmp_path / "hosts.yml", {"all": {
        "children": {"appliance_etcd": {"hosts": members},
                     "appliance_nodes": {"hosts": {name: {} for name in members}}},
        "vars": {**OFFLINE_APT, "ansible_user": "root",
                 "ansible_ssh_private_key_file": str(key),
                 "ansible_python_interpreter": "/usr/bin/python3",
                 "ansible_ssh_common_args": "-o UserKnownHostsFile=/dev/null",
                 "appliance_node_deb": str(debs.first),
                 "appliance_prereqs_packages": PREREQS,
                 "appliance_etcd_ca_dir": str(tmp_path / "pki"),
                 "appliance_etcd_extra_env": {
                     "ETCD_LOGGER": "zap",
                     "ETCD_LOG_OUTPUTS": "/var/lib/etcd/etcd.log"}}}})
    summary = playbook(["-i", str(inventory)], ansible_env(tmp_path / "home"))
    assert set(summary) >= set(names), summary

    first = names["node1"]

    def ready() -> list[str]:
        listed = json.loads(first.run(["appliance", "node", "list", "-o", "json"]).stdout)
        return sorted(node["name"] for node in listed if node["state"] == "ready")

    wait_for(lambda: ready() == sorted(names), 60, "three ready nodes")
    for box in boxes:  # one token for the cluster, derived from the one cluster key
        assert box.path("/var/lib/appliance/token").read_text() == \
            first.path("/var/lib/appliance/token").read_text()
        assert box.path("/var/lib/appliance/cluster.key").stat().st_mode & 0o777 == 0o600
    health = first.run(["etcdctl", f"--endpoints=https://{first.address}:2379",
                        "--cacert=/etc/appliance/etcd/ca.crt",
                        "--cert=/etc/appliance/etcd/client.crt",
                        "--key=/etc/appliance/etcd/client.key", "endpoint", "health",
                        "--cluster"], env={**os.environ, "ETCDCTL_API": "3"})
    said = health.stdout + health.stderr  # etcdctl 3.4 reports health on stderr
    assert health.returncode == 0 and said.count("is healthy") == 3, said

    created = first.run(["appliance", "volume", "create", "trio", "--size", "64M",
                         "--replicas", "3"])
    assert created.returncode == 0, created.stdout + created.stderr
    shown = json.loads(first.run(["appliance", "volume", "show", "trio", "-o",
                                  "json"]).stdout)
    placed = sorted(str(replica["node"]) for replica in shown["replica_list"])
    assert placed == sorted(names), shown
