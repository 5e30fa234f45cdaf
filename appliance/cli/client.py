"""The CLI's connection to a node's REST API: one place where HTTP errors become the
error hierarchy again (and an API "not found" exits with status 3).

What the operator gives is checked before and after the first request, and each problem is
named with the file or URL and what to do: a token file that is missing, empty, not a file,
not a token, or readable by others (refused, like every secret file of the appliance: the
token controls the node, and the daemon writes it mode 0600); a URL that is not http(s), or
whose answers are not the appliance API's (another server, or a path that is not the API's).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import click
import httpx

from appliance.defaults import API_URL
from appliance.errors import (
    ApplianceError,
    AuthenticationFailed,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    error_class,
)

DEFAULT_URL = API_URL
DEFAULT_TOKEN_FILE = "/var/lib/appliance/token"  # noqa: S105 - a path, not a secret
MAX_TOKEN = 4096
_WHERE = ("the node daemon writes its token to DATA_DIR/token (give it with --token-file or "
          f"APPLIANCE_TOKEN_FILE; default {DEFAULT_TOKEN_FILE})")


class RemoteNotFound(NotFound):
    """An object the API does not know."""

    exit_code = 3


def read_token(path: Path) -> str:
    """The API token in *path*: a regular file that only its owner can read, holding one
    line of printable ASCII (the daemon writes 64 hex digits)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO: no wait
    except FileNotFoundError:
        raise NotFound(f"token file {path} does not exist: {_WHERE}") from None
    except PermissionError:
        raise InvalidArgument(f"token file {path} cannot be read (permission denied): run "
                              "this as its owner (root for the daemon's)") from None
    except OSError as exc:
        raise InvalidArgument(f"token file {path} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            inside = path / "token"
            raise InvalidArgument(f"token file {path} is a directory, not a file: " + (
                f"give {inside}" if inside.is_file() else _WHERE))
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"token file {path} is not a regular file: {_WHERE}")
        if info.st_mode & 0o077:
            raise FailedPrecondition(
                f"token file {path} can be read by others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); whoever reads it controls the node: "
                f"make it readable by its owner only (chmod 600 {path})")
        data = os.read(fd, MAX_TOKEN + 1)
    finally:
        os.close(fd)
    token = data.strip()
    if not token:
        raise InvalidArgument(f"token file {path} is empty: {_WHERE}")
    if len(data) > MAX_TOKEN or not all(0x21 <= byte < 0x7F for byte in token):
        raise InvalidArgument(f"token file {path} does not hold an API token (one line of "
                              f"printable characters): {_WHERE}")
    return token.decode()


def check_url(url: str) -> str:
    """*url* without a final ``/``; InvalidArgument unless it is an http(s) URL."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidArgument(f"--url {url!r} is not the http:// or https:// address of the "
                              f"appliance API, such as {DEFAULT_URL} (--url or APPLIANCE_URL)")
    return url.rstrip("/")


def _appliance_error(response: httpx.Response) -> dict[str, str] | None:
    """The error of an answer in the appliance API's shape, else None."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not (isinstance(error, dict) and isinstance(error.get("code"), str)
            and isinstance(error.get("message"), str)):
        return None
    return error


class ApiClient:
    def __init__(self, url: str, token_file: Path) -> None:
        self.url = check_url(url)
        self.token_file = token_file
        token = read_token(token_file)
        self._client = httpx.Client(base_url=self.url, timeout=60,
                                    headers={"Authorization": f"Bearer {token}"})

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach the appliance API at {self.url}: {exc}") from exc
        if response.status_code == 401:
            raise AuthenticationFailed(f"authentication failed: {self.url} refused the token "
                                       f"in {self.token_file}")
        if response.status_code >= 400:
            error = _appliance_error(response)
            if error is None or error["code"] in ("no-route", "method-not-allowed"):
                raise self._not_the_api(method, path, response)
            cls = RemoteNotFound if error["code"] == "not-found" else \
                error_class(error["code"])
            raise cls(error["message"] or "failed")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise self._not_the_api(method, path, response) from None

    def _not_the_api(self, method: str, path: str, response: httpx.Response) -> ApplianceError:
        """The error for an answer that is not the appliance API's answer to *path*."""
        status = response.status_code
        if self._healthy():  # the API is there: it lacks the route
            return FailedPrecondition(f"the appliance API at {self.url} has no route {method} "
                                      f"{path} (HTTP {status}): is the node daemon older than "
                                      "this client?")
        what = f"{method} {response.url} answered HTTP {status}"
        if status >= 500:
            return Unavailable(f"the appliance API at {self.url} is not available: {what}")
        kind = response.headers.get("content-type", "").split(";")[0]
        return InvalidArgument(
            f"{self.url} does not look like the appliance API: {what}"
            + (f" ({kind})" if kind and kind != "application/json" else "")
            + f"; give the node daemon's address, such as {DEFAULT_URL}, without a path "
            "(--url or APPLIANCE_URL)")

    def _healthy(self) -> bool:
        try:
            answer = self._client.get("/healthz")
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and answer.text.strip() == "ok"


def client_options(function: Any) -> Any:
    function = click.option("--token-file", type=click.Path(path_type=Path),
                            envvar="APPLIANCE_TOKEN_FILE", default=DEFAULT_TOKEN_FILE,
                            show_default=True, show_envvar=True,
                            help="The API token (DATA_DIR/token).")(function)
    return click.option("--url", envvar="APPLIANCE_URL", default=DEFAULT_URL,
                        show_default=True, show_envvar=True, help="The node's API.")(function)


def api(url: str, token_file: Path) -> ApiClient:
    return ApiClient(url, token_file)
