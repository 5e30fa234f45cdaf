"""The connection to a node's REST API, for its clients (the CLI, the CSI plugin): one
place where HTTP errors become the error hierarchy again.

What the operator gives is checked before and after the first request, and each problem is
named with the file or URL and what to do: a token file that is missing, empty, not a file,
not a token, or readable by others (refused, like every secret file of the appliance: the
token controls the node, and the daemon writes it mode 0600); a URL that is not http(s), or
whose answers are not the appliance API's (another server, or a path that is not the API's).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

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
# the codes of a volume's last error that its next pass may cure by itself
TRANSIENT = frozenset({"unavailable", "conflict", "busy", "stale-session", "io-error"})


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


class VolumeObserver:
    """What a wait on a volume reports as it goes (the CLI draws it; others ignore it)."""

    def state(self, state: str) -> None:
        """The volume is in *state*."""

    def fraction(self, fraction: float) -> None:
        """A copy into it is this far."""

    def say(self, text: str) -> None:
        """The daemon says *text* of it."""

    def end(self, complete: bool) -> None:
        """The wait ends (*complete*: what it waited for happened)."""


def wait_for_volume(client: ApiClient, name: str,
                    done: Callable[[dict[str, Any] | None], bool], what: str, *,
                    timeout: float, observer: VolumeObserver | None = None,
                    interval: float = 0.2) -> dict[str, Any] | None:
    """Poll volume *name* until done(volume) (None when it is gone). Stops early with the
    daemon's error when a pass failed in a way that the next pass will not cure by itself
    (a refused placement, a name that cannot work, a failed copy); Unavailable after
    *timeout* seconds."""
    observer = observer or VolumeObserver()
    deadline = time.monotonic() + timeout
    said = ""
    while True:
        try:
            info: dict[str, Any] | None = client.call("GET", f"/v1/volumes/{name}")
        except RemoteNotFound:
            info = None  # gone: what delete waits for
        if done(info):
            observer.end(complete=True)
            return info
        state = info["state"] if info else "gone"
        observer.state(state)
        copied = info.get("progress") if info else None
        if copied and copied["total_bytes"]:
            observer.fraction(copied["done_bytes"] / copied["total_bytes"])
        if info and info.get("message") and info["message"] != said:
            said = info["message"]
            observer.say(said)
        if info and info.get("error") and info["error"] not in TRANSIENT:
            observer.end(complete=False)
            cls = error_class(info["error"])
            raise cls(f"volume {name} is {state}: {info['message']} (the daemon keeps trying; "
                      "act on the cause, or undo the request)")
        if time.monotonic() > deadline:
            observer.end(complete=False)
            raise Unavailable(f"volume {name} did not finish ({what}) in {timeout:.0f} s; "
                              f"it is {state}" + (f": {said}" if said else "")
                              + " (the daemon goes on)")
        time.sleep(interval)


def wait_for_copy(client: ApiClient, name: str, what: str, *, timeout: float,
                  observer: VolumeObserver | None = None) -> None:
    """Wait until new volume *name*, being filled by a clone or a restore, is usable; a
    copy that failed removes the volume: its reason (kept in the events) is raised."""
    info = wait_for_volume(client, name, lambda v: v is None or v["state"] != "creating",
                           what, timeout=timeout, observer=observer)
    if info is not None and info["state"] != "failed" and not info["deleting"]:
        return
    message = info["message"] if info else ""
    if not message:
        for event in reversed(client.call("GET", f"/v1/events?volume={quote(name, safe='')}")):
            if event["kind"] == "state" and "-> failed" in event["message"]:
                message = event["message"].split("-> failed", 1)[1].lstrip(": ")
                break
    raise FailedPrecondition(f"volume {name}: {message or what + ' failed'}; what it had "
                             "copied is removed")
