"""One contract for every backup target (file:// and s3:// here; nfs:// is a file target on
a kernel mount), and the target URL rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.backup.store import BackupStore
from appliance.backup.targets import open_target, opened, parse_target
from appliance.backup.targets.base import ObjectStore
from appliance.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StorageIOError,
    Unavailable,
)
from tests.backup.conftest import S3Endpoint
from tests.harness import free_port


def test_put_get_replace(target: ObjectStore) -> None:
    target.put("volumes/ab/v/volume.json", b'{"a": 1}')
    assert target.get("volumes/ab/v/volume.json") == b'{"a": 1}'
    target.put("volumes/ab/v/volume.json", b"x" * 3_000_000)  # replaced whole
    assert target.get("volumes/ab/v/volume.json") == b"x" * 3_000_000
    target.put("empty", b"")
    assert target.get("empty") == b""


def test_missing_objects(target: ObjectStore) -> None:
    with pytest.raises(NotFound, match="no object"):
        target.get("volumes/none")
    assert not target.exists("volumes/none")
    target.delete("volumes/none")  # nothing to do, no error


def test_list_below_a_prefix(target: ObjectStore) -> None:
    names = {"a/1", "a/b/2", "a/b/c/3", "ab/4", "z"}
    for name in names:
        target.put(name, name.encode())
    assert set(target.list("a/")) == {"a/1", "a/b/2", "a/b/c/3"}
    assert set(target.list("a/b/")) == {"a/b/2", "a/b/c/3"}
    assert set(target.list("")) == names
    assert list(target.list("nothing/")) == []
    target.delete("a/b/2")
    assert set(target.list("a/")) == {"a/1", "a/b/c/3"}
    assert target.exists("a/1") and not target.exists("a/b/2")


@pytest.mark.parametrize("name", ["", "/abs", "a//b", "a/../b", "..", "a/./b", "a\0b",
                                  "a b", "a/", "x" * 2000])
def test_bad_names_change_nothing(target: ObjectStore, name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid object name"):
        target.put(name, b"data")
    with pytest.raises(InvalidArgument):
        target.get(name)
    assert list(target.list("")) == []


def test_many_objects_listed(target: ObjectStore) -> None:
    names = {f"blocks/{i % 7:02x}/{i:064x}" for i in range(1100)}  # more than one S3 page
    for name in names:
        target.put(name, b"")
    assert set(target.list("blocks/")) == names


def test_a_probe_proves_the_target_and_leaves_nothing(target: ObjectStore) -> None:
    BackupStore(target).probe()
    assert list(target.list("")) == []


def test_a_probe_of_a_target_that_cannot_be_written_fails() -> None:
    with opened("file:///proc") as target, \
            pytest.raises(StorageIOError, match="cannot write appliance-backups/probes/"):
        BackupStore(target).probe()


def test_file_target_leaves_no_partial_object(tmp_path: Path) -> None:
    with opened(f"file://{tmp_path}") as store:
        store.put("d/obj", b"1" * 100_000)
        store.put("d/obj", b"2" * 100)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["obj"]
    assert (tmp_path / "d" / "obj").stat().st_mode & 0o777 == 0o600


def test_file_target_must_exist(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not a directory"):
        open_target(parse_target(f"file://{tmp_path}/absent"))


@pytest.mark.parametrize(("url", "message"), [
    ("", "file:///PATH"),
    ("ftp://host/x", "scheme"),
    ("file://relative/path", "ABSOLUTE"),
    ("file:///x?opt=1", "no options"),
    ("nfs://server", "EXPORT"),
    ("nfs:///export", "SERVER"),
    ("nfs://server/../x", "EXPORT"),
    ("s3://Bad_Bucket/x", "bucket name"),
    ("s3://b", "bucket name"),
    ("s3://key:secret@bucket/x", "credentials do not belong"),
    ("s3://bucket/x?colour=red", "unknown option 'colour'"),
    ("s3://bucket/x?endpoint=ftp://e", "http"),
    ("s3://bucket/a/../b", "'..'"),
    ("file:///a\nb", "file:///PATH"),
])
def test_malformed_urls(url: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_target(url)


def test_url_parts() -> None:
    s3 = parse_target("s3://bucket/some/prefix?endpoint=http://127.0.0.1:9000&region=eu-1")
    assert (s3.host, s3.path, s3.endpoint, s3.region) == \
        ("bucket", "some/prefix", "http://127.0.0.1:9000", "eu-1")
    nfs = parse_target("nfs://filer.example/exports/backups/cluster1")
    assert (nfs.host, nfs.export, nfs.path) == ("filer.example", "/exports", "backups/cluster1")
    assert parse_target("file:///mnt/backups/").path == "/mnt/backups"


def test_nfs_without_a_kernel_client_is_a_clear_error() -> None:
    filesystems = Path("/proc/filesystems").read_text()
    if "nfs" in filesystems:
        pytest.skip("this kernel has an NFS client")
    with pytest.raises(FailedPrecondition, match="no NFS client"):
        open_target(parse_target("nfs://127.0.0.1/export/backups"))


def test_s3_needs_credentials(s3_endpoint: S3Endpoint, tmp_path: Path) -> None:
    spec = parse_target(s3_endpoint.url("p"))
    with pytest.raises(InvalidArgument, match="--credentials"):
        open_target(spec)
    with pytest.raises(NotFound, match="does not exist"):
        open_target(spec, tmp_path / "absent")
    loose = tmp_path / "loose"
    loose.write_text(s3_endpoint.credentials.read_text())
    os.chmod(loose, 0o644)
    with pytest.raises(FailedPrecondition, match="0600"):
        open_target(spec, loose)
    malformed = tmp_path / "malformed"
    malformed.write_text("aws_access_key_id=x\n")
    malformed.chmod(0o600)
    with pytest.raises(InvalidArgument, match=r"\[default\]"):
        open_target(spec, malformed)


def test_s3_missing_bucket_and_unreachable_endpoint(s3_endpoint: S3Endpoint) -> None:
    with pytest.raises(NotFound, match="bucket nosuchbucket does not exist"):
        open_target(parse_target(s3_endpoint.url("p").replace(s3_endpoint.bucket,
                                                               "nosuchbucket")),
                    s3_endpoint.credentials)
    closed = f"s3://bucket/p?endpoint=http://127.0.0.1:{free_port()}"
    with pytest.raises(Unavailable, match="cannot be reached"):
        open_target(parse_target(closed), s3_endpoint.credentials)


def test_secrets_stay_out_of_errors(s3_endpoint: S3Endpoint) -> None:
    secret = "testing-secret"
    assert secret in s3_endpoint.credentials.read_text()
    try:
        open_target(parse_target(s3_endpoint.url("p").replace(s3_endpoint.bucket, "nobucket")),
                    s3_endpoint.credentials)
    except NotFound as exc:
        assert secret not in str(exc) and "testing" not in str(exc)
