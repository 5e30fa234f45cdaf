"""The benchmarks run (a seconds-long smoke run; their figures are not checked here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_chain_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.chain_bench", "--quick", "--dir", str(tmp_path / "b"),
         "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "4K random read" in result.stdout and "open 1G replica" in result.stdout
    assert (tmp_path / "out.json").exists()


@pytest.mark.slow  # a third of a minute: a daemon with volumes, attach and idle CPU
def test_node_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.node_bench", "--quick", "--dir", str(tmp_path / "b"),
         "--port", "0", "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "GET /v1/volumes, 5 volumes" in result.stdout and "idle attached" in result.stdout
    assert (tmp_path / "out.json").exists()


@pytest.mark.skipif(shutil.which("etcd") is None,
                    reason="etcd-server is not installed (./setup.sh installs it)")
def test_store_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.store_bench", "--quick", "--dir", str(tmp_path / "b"),
         "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "watch delivery" in result.stdout and "volume list handler" in result.stdout
    assert (tmp_path / "out.json").exists()


@pytest.mark.slow  # backups and restores of three kinds of data
def test_backup_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.backup_bench", "--quick", "--dir", str(tmp_path / "b"),
         "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "of the plain copy" in result.stdout and "incremental after" in result.stdout
    assert (tmp_path / "out.json").exists()


def test_hotpath_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.hotpath", "--quick", "--py-spy", "--strace", "--dir",
         str(tmp_path / "b"), "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "CPU-us/IO" in result.stdout and "syscalls/IO" in result.stdout
    assert (tmp_path / "out.json").exists()


@pytest.mark.slow  # variants of the attach path: a quarter minute, with the slow tests
def test_device_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.device_bench", "--quick", "--variants", "default,attach",
         "--workloads", "4k-randread,4k-randwrite", "--dir", str(tmp_path / "b"),
         "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "attach" in result.stdout and "4k-randwrite" in result.stdout
    assert (tmp_path / "out.json").exists()


@pytest.mark.slow  # two minutes: a cluster of four namespace nodes and three etcd members
@pytest.mark.skipif(shutil.which("etcd") is None,
                    reason="etcd-server is not installed (./setup.sh installs it)")
def test_cluster_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.cluster_bench", "--quick", "--dir", str(tmp_path / "b"),
         "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr
    assert "GET /v1/volumes" in result.stdout and "forced attach" in result.stdout
    assert (tmp_path / "out.json").exists()


@pytest.mark.slow  # a quarter minute: the CSI flows run again beside the CLI's
def test_csi_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.csi_bench", "--quick", "--dir", str(tmp_path / "b"),
         "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "ready for a pod, a mounted ext4" in result.stdout
    assert "NodeGetVolumeStats" in result.stdout
    assert (tmp_path / "out.json").exists()


@pytest.mark.slow  # minutes: a package is built and a node converged twice
def test_provision_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.provision_bench", "--quick", "--dir", str(tmp_path / "b"),
         "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converge of one node from nothing" in result.stdout
    assert "idempotent re-run" in result.stdout
    assert (tmp_path / "out.json").exists()


@pytest.mark.slow  # a third of a minute: a daemon, a target, tgt on a file beside it
def test_iscsi_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.iscsi_bench", "--quick", "--dir", str(tmp_path / "b"),
         "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4K random write QD32" in result.stdout and "1 replica(s)" in result.stdout
    assert (tmp_path / "out.json").exists()


@pytest.mark.slow  # a third of a minute: a daemon, two shares, ganesha on a directory
def test_nfs_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.nfs_bench", "--quick", "--dir", str(tmp_path / "b"),
         "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sequential read MiB/s" in result.stdout and "1 replica(s)" in result.stdout
    assert (tmp_path / "out.json").exists()


@pytest.mark.slow  # a minute: two daemons, ext4, a backup, scrubs, a standby
def test_protection_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.protection_bench", "--quick", "--dir",
         str(tmp_path / "b"), "--port", "0", "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert "backup mount:" in result.stdout and "standby:" in result.stdout
    assert (tmp_path / "out.json").exists()


@pytest.mark.slow  # a quarter of a minute: a daemon with ten volumes and a browser
def test_ui_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.ui_bench", "--quick", "--dir", str(tmp_path / "b"),
         "--port", "0", "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "first render" in result.stdout and "GET /v1/volumes alone" in result.stdout
    assert (tmp_path / "out.json").exists()
