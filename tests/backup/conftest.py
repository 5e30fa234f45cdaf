"""Backup targets for the contract tests: a directory, and an S3 endpoint served by moto in
server mode over real HTTP on loopback (a real S3-compatible endpoint replaces it when
APPLIANCE_TEST_S3_ENDPOINT, _BUCKET and _CREDENTIALS are set)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from appliance.backup.targets import opened
from appliance.backup.targets.base import ObjectStore
from tests.harness import free_port, wait_for

MOTO = str(Path(sys.executable).parent / "moto_server")


class S3Endpoint:
    def __init__(self, endpoint: str, bucket: str, credentials: Path) -> None:
        self.endpoint, self.bucket, self.credentials = endpoint, bucket, credentials

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}?endpoint={self.endpoint}&region=us-east-1"


def _reachable(url: str) -> bool:
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError as exc:
        return "HTTP Error" in str(exc)  # it answered


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    if os.environ.get("APPLIANCE_TEST_S3_ENDPOINT"):
        yield S3Endpoint(os.environ["APPLIANCE_TEST_S3_ENDPOINT"],
                         os.environ["APPLIANCE_TEST_S3_BUCKET"],
                         Path(os.environ["APPLIANCE_TEST_S3_CREDENTIALS"]))
        return
    root = tmp_path_factory.mktemp("moto")
    port = free_port()
    log = open(root / "moto.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _reachable(endpoint), 60, "the moto S3 server")
        credentials = root / "credentials"
        credentials.write_text("[default]\naws_access_key_id = testing\n"
                               "aws_secret_access_key = testing-secret\n")
        credentials.chmod(0o600)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="testing",
                     aws_secret_access_key="testing-secret").create_bucket(Bucket="backups")
        yield S3Endpoint(endpoint, "backups", credentials)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(params=["file", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """An empty target of each kind."""
    if request.param == "file":
        (tmp_path / "target").mkdir()
        with opened(f"file://{tmp_path / 'target'}") as store:
            yield store
    else:
        endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
        with opened(endpoint.url(f"test-{uuid.uuid4().hex[:12]}"),
                    endpoint.credentials) as store:
            yield store
