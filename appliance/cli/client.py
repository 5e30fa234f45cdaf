"""The CLI's connection to a node's REST API: one place where HTTP errors become the
error hierarchy again (and an API "not found" exits with status 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import httpx

from appliance.defaults import API_URL
from appliance.errors import AuthenticationFailed, NotFound, Unavailable, error_class

DEFAULT_URL = API_URL
DEFAULT_TOKEN_FILE = "/var/lib/appliance/token"  # noqa: S105 - a path, not a secret


class RemoteNotFound(NotFound):
    """An object the API does not know."""

    exit_code = 3


class ApiClient:
    def __init__(self, url: str, token_file: Path) -> None:
        try:
            token = token_file.read_text().strip()
        except FileNotFoundError:
            raise NotFound(f"token file {token_file} does not exist (the daemon creates it in "
                           "its data directory)") from None
        except PermissionError:
            raise click.UsageError(f"token file {token_file} cannot be read") from None
        self.url = url.rstrip("/")
        self.token_file = token_file
        self._client = httpx.Client(base_url=self.url, timeout=60,
                                    headers={"Authorization": f"Bearer {token}"})

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach the appliance API at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "failed", "message": f"HTTP {response.status_code}"}
            if response.status_code == 401:
                raise AuthenticationFailed(f"authentication failed: {self.url} refused the token "
                                           f"in {self.token_file}")
            cls = RemoteNotFound if error.get("code") == "not-found" else \
                error_class(error.get("code", "failed"))
            raise cls(error.get("message", "failed"))
        return response.json() if response.content else None


def client_options(function: Any) -> Any:
    function = click.option("--token-file", type=click.Path(path_type=Path),
                            envvar="APPLIANCE_TOKEN_FILE", default=DEFAULT_TOKEN_FILE,
                            show_default=True, help="The API token (DATA_DIR/token).")(function)
    return click.option("--url", envvar="APPLIANCE_URL", default=DEFAULT_URL,
                        show_default=True, help="The node's API.")(function)


def api(url: str, token_file: Path) -> ApiClient:
    return ApiClient(url, token_file)
