"""A backup target in an S3-compatible object store (boto3).

Credentials come from a file given at the edge, in the AWS shared-credentials format
(``[default]`` with ``aws_access_key_id`` and ``aws_secret_access_key``, optionally
``aws_session_token``); the file must be readable by its owner only. They are never logged
and never part of an error message. A PUT is atomic in S3.
"""

from __future__ import annotations

import configparser
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from appliance.backup.targets.base import ObjectStore, check_name, check_prefix
from appliance.errors import (
    AuthenticationFailed,
    InvalidArgument,
    NotFound,
    StorageIOError,
    Unavailable,
)
from appliance.secrets import read_private_file

_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
               "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"}


def read_credentials(path: Path) -> dict[str, str]:
    text = read_private_file(path, 64 << 10).decode(errors="replace")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error:
        raise InvalidArgument(f"credentials file {path} is not in the "
                              "'[default] aws_access_key_id = ...' format") from None
    section = parser["default"] if parser.has_section("default") else None
    if section is None or not section.get("aws_access_key_id") or \
            not section.get("aws_secret_access_key"):
        raise InvalidArgument(f"credentials file {path} needs a [default] section with "
                              "aws_access_key_id and aws_secret_access_key")
    credentials = {"aws_access_key_id": section["aws_access_key_id"].strip(),
                   "aws_secret_access_key": section["aws_secret_access_key"].strip()}
    if section.get("aws_session_token"):
        credentials["aws_session_token"] = section["aws_session_token"].strip()
    return credentials


class S3Store(ObjectStore):
    def __init__(self, bucket: str, prefix: str, *, credentials: dict[str, str],
                 endpoint: str | None = None, region: str | None = None,
                 timeout: float = 30.0) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint}" if endpoint else "")
        config = botocore.config.Config(
            connect_timeout=timeout, read_timeout=timeout, max_pool_connections=32,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"} if endpoint else None)
        self._client: Any = boto3.session.Session(
            aws_access_key_id=credentials["aws_access_key_id"],
            aws_secret_access_key=credentials["aws_secret_access_key"],
            aws_session_token=credentials.get("aws_session_token"),
        ).client("s3", endpoint_url=endpoint, region_name=region or "us-east-1", config=config)
        self._call("head_bucket", "reach the bucket", Bucket=bucket)

    def _call(self, operation: str, what: str, **arguments: Any) -> Any:
        try:
            return getattr(self._client, operation)(**arguments)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") and operation != "head_bucket":
                raise NotFound(f"backup target {self.url}: no object "
                               f"{arguments.get('Key', '')}") from None
            if code in ("NoSuchBucket",) or (operation == "head_bucket" and status == 404):
                raise NotFound(f"backup target {self.url}: bucket {self.bucket} does not "
                               "exist") from None
            if code in _AUTH_CODES or status in (401, 403):
                raise AuthenticationFailed(f"backup target {self.url} refused the "
                                           f"credentials ({code or status})") from None
            raise StorageIOError(f"backup target {self.url}: cannot {what}: "
                                 f"{code or status}") from None
        except (botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.ReadTimeoutError,
                botocore.exceptions.ConnectionClosedError) as exc:
            raise Unavailable(f"backup target {self.url} cannot be reached: "
                              f"{type(exc).__name__}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageIOError(f"backup target {self.url}: cannot {what}: "
                                 f"{type(exc).__name__}") from None

    def _key(self, name: str) -> str:
        return self.prefix + check_name(name)

    def put(self, name: str, data: bytes) -> None:
        self._call("put_object", f"write {name}", Bucket=self.bucket, Key=self._key(name),
                   Body=data)

    def get(self, name: str) -> bytes:
        response = self._call("get_object", f"read {name}", Bucket=self.bucket,
                              Key=self._key(name))
        try:
            data: bytes = response["Body"].read()
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise Unavailable(f"backup target {self.url}: reading {name} was cut: "
                              f"{type(exc).__name__}") from None
        return data

    def exists(self, name: str) -> bool:
        try:
            self._call("head_object", f"look up {name}", Bucket=self.bucket,
                       Key=self._key(name))
        except NotFound:
            return False
        return True

    def list(self, prefix: str) -> Iterator[str]:
        full = self.prefix + check_prefix(prefix)
        token: str | None = None
        while True:
            arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            if token:
                arguments["ContinuationToken"] = token
            page = self._call("list_objects_v2", f"list {prefix or '/'}", **arguments)
            for item in page.get("Contents", []):
                yield str(item["Key"])[len(self.prefix):]
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def delete(self, name: str) -> None:
        self._call("delete_object", f"delete {name}", Bucket=self.bucket, Key=self._key(name))

    def close(self) -> None:
        self._client.close()
