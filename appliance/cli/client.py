"""The CLI's options for the node's REST API (the connection itself is
:mod:`appliance.apiclient`; an API "not found" exits with status 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from appliance.apiclient import (
    DEFAULT_TOKEN_FILE,
    DEFAULT_URL,
    TRANSIENT,
    ApiClient,
    RemoteNotFound,
    check_url,
    read_token,
)

__all__ = ["DEFAULT_TOKEN_FILE", "DEFAULT_URL", "TRANSIENT", "ApiClient", "RemoteNotFound",
           "api", "check_url", "client_options", "read_token"]


def client_options(function: Any) -> Any:
    function = click.option("--token-file", type=click.Path(path_type=Path),
                            envvar="APPLIANCE_TOKEN_FILE", default=DEFAULT_TOKEN_FILE,
                            show_default=True, show_envvar=True,
                            help="The API token (DATA_DIR/token).")(function)
    return click.option("--url", envvar="APPLIANCE_URL", default=DEFAULT_URL,
                        show_default=True, show_envvar=True, help="The node's API.")(function)


def api(url: str, token_file: Path) -> ApiClient:
    return ApiClient(url, token_file)
