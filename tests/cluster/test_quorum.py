"""The cluster's state in a 3-member etcd: one member lost changes nothing; without a
quorum, attached volumes keep serving I/O while the API says why it cannot answer; with
the quorum back, everything goes on."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.harness import Cluster
from tests.etcd import Etcd
from tests.harness import VERIFY, engine_writes, fio_errors, wait_for

WRITES = 200


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[Etcd]:
    (tmp_path / "etcd").mkdir()
    running = Etcd(tmp_path / "etcd", size=3)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.slow  # a minute: with the slow tests, to keep the default suite in its budget
def test_etcd_members_lost_and_back(tmp_path: Path, etcd3: Etcd) -> None:
    cluster = Cluster(tmp_path, 3, etcd3)
    try:
        cluster.start()
        n1, n2, _ = cluster.nodes
        n1.cli("volume", "create", "v", "--size", "64M", "--replicas", "3")
        n1.cli("volume", "attach", "v")
        etcd3.kill("e0")  # the member every node asks first
        n2.cli("volume", "create", "w", "--size", "16M", "--replicas", "2")
        assert [n["state"] for n in n2.json("node", "list")] == ["ready"] * 3
        uri = f"nbd+unix:///?socket={n1.data / 'run' / 'v' / 'nbd.sock'}"
        workload = subprocess.Popen(
            ["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *VERIFY,
             "--verify_state_save=0", "--size=32M", "--time_based", "--runtime=25"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        control = n1.engine_control("v")
        wait_for(lambda: engine_writes(control) >= WRITES, 60, "fio writing")
        etcd3.kill("e1")  # no quorum
        before = engine_writes(control)
        wait_for(lambda: engine_writes(control) >= before + WRITES, 60,
                 "writes served without a quorum")
        refused = n2.cli("volume", "list", check=False, timeout=120)
        assert refused.returncode == 1 and "quorum" in refused.stderr, refused
        etcd3.start("e1")
        stdout, stderr = workload.communicate(timeout=180)
        result = subprocess.CompletedProcess(workload.args, workload.returncode, stdout,
                                             stderr)
        assert workload.returncode == 0 and fio_errors(result) == 0, stderr
        wait_for(lambda: n2.cli("volume", "list", check=False).returncode == 0, 60,
                 "the API back")
        wait_for(lambda: [n["state"] for n in n2.json("node", "list")] == ["ready"] * 3, 60,
                 "every node ready again")
        n2.cli("volume", "create", "x", "--size", "16M", "--replicas", "3")
        assert n1.json("volume", "show", "v")["robustness"] == "healthy"
        assert os.path.exists(n1.json("volume", "show", "v")["device"])
    finally:
        cluster.cleanup()
