"""The REST API against its own OpenAPI document (schemathesis: valid and invalid requests
to every operation, with and without the token: no 5xx, nothing served unauthenticated,
the daemon stays up; RELIABILITY rows 17 and 18), and the metrics exposition checked by
``promtool check metrics`` on a live scrape."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from tests.harness import Node

# Adding a disk writes replicas wherever the path points: fuzzing it would scatter
# directories over this machine. Its bad input is covered in test_daemon.py.
NOT_FUZZED = {"POST /v1/disks"}
EXAMPLES = 15
PUBLIC = {"GET /healthz"}  # for load balancers and supervisors; says only "ok"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    running = Node(tmp_path_factory.mktemp("contract"))
    running.start()
    running.cli("volume", "create", "known", "--size", "16M", "--replicas", "1")
    try:
        yield running
    finally:
        running.cleanup()


def openapi(node: Node) -> Any:
    """The OpenAPI document (it needs the token too)."""
    return httpx.get(node.url + "/openapi.json", headers={
        "Authorization": f"Bearer {node.token_file.read_text().strip()}"}).json()


def operations(node: Node) -> list[Any]:
    document = openapi(node)
    schema = schemathesis.openapi.from_dict(document)
    found = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    return [op for op in found if op.label not in NOT_FUZZED]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(node: Node, mode: GenerationMode) -> None:
    token = node.token_file.read_text().strip()
    checked = []
    for operation in operations(node):
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            response = case.call(base_url=node.url,
                                 headers={"Authorization": f"Bearer {token}"}, timeout=60)
            assert response.status_code < 500, (case.method, case.formatted_path,
                                                case.body, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["code"] and error["message"]

        try:
            check()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # nothing in it can be made invalid
            continue
        checked.append(operation.label)
    assert len(checked) >= (12 if mode == GenerationMode.POSITIVE else 8), checked
    assert httpx.get(node.url + "/healthz").status_code == 200  # still up


def test_nothing_served_without_the_token(node: Node) -> None:
    assert httpx.get(node.url + "/openapi.json").status_code == 401
    document = openapi(node)
    public = {f"{method.upper()} {path}" for path, item in document["paths"].items()
              for method, definition in item.items() if not definition.get("security")}
    assert public == PUBLIC  # the document says which need the token
    for operation in operations(node):
        if operation.label in PUBLIC:
            continue
        @settings(max_examples=5, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            for headers in ({}, {"Authorization": "Bearer not-the-token"}):
                response = case.call(base_url=node.url, headers=headers, timeout=60)
                assert response.status_code == 401, (case.method, case.formatted_path)

        check()
    assert [v["name"] for v in httpx.get(
        node.url + "/v1/volumes",
        headers={"Authorization": f"Bearer {node.token_file.read_text().strip()}"}).json()] \
        == ["known"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is installed by setup.sh")
def test_metrics_pass_promtool(node: Node, tmp_path: Path) -> None:
    node.cli("volume", "attach", "known")
    token = node.token_file.read_text().strip()
    scrape = httpx.get(node.url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    assert scrape.status_code == 200
    text = scrape.text
    for family in ("appliance_volume_state", "appliance_volume_robustness",
                   "appliance_volume_size_bytes", "appliance_volume_actual_size_bytes",
                   "appliance_replica_mode", "appliance_volume_read_bytes_total",
                   "appliance_volume_write_operations_total",
                   "appliance_volume_write_latency_seconds_bucket",
                   "appliance_disk_capacity_bytes", "appliance_disk_scheduled_bytes",
                   "appliance_node_info"):
        assert family in text, family
    result = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                            capture_output=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    node.cli("volume", "detach", "known")
