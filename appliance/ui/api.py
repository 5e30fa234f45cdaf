"""The UI's way to the node: the REST API, with the daemon's token.

In the daemon the requests go to the API's ASGI app in the same process (no socket, but
every layer of the API: authentication, validation, forwarding to the node a request
belongs to, error translation); the answers are the API's JSON, and its errors come back as
the error hierarchy, with the API's message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx
import trio

from appliance.errors import ApplianceError, Unavailable, error_class

TIMEOUT = 330.0  # the slowest request the API answers (a waited detach)
TARGET_TIMEOUT = 20.0  # a listing of the backup target that a page waits for


def part(value: str) -> str:
    """*value* as one path segment."""
    return quote(value, safe="")


class Api:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    @classmethod
    def in_process(cls, app: Any, token: str) -> Api:
        return cls(httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://appliance.internal",
            headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT))

    async def call(self, method: str, path: str, body: Any = None,
                   params: dict[str, Any] | None = None, timeout: float = TIMEOUT) -> Any:
        try:
            with trio.fail_after(timeout):  # httpx's timeouts do not reach an ASGI app
                response = await self.client.request(method, path, json=body, params=params)
        except trio.TooSlowError:
            raise Unavailable(f"the node's API did not answer {method} {path} within "
                              f"{timeout:.0f} s") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"the node's API did not answer: {exc or type(exc).__name__}"
                              ) from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                cls, message = error_class(error["code"]), str(error["message"])
            except (ValueError, KeyError, TypeError):
                cls, message = ApplianceError, f"HTTP {response.status_code} from {path}"
            raise cls(message)
        return response.json() if response.content else None

    async def get(self, path: str, timeout: float = TIMEOUT, **params: Any) -> Any:
        return await self.call("GET", path, params={k: v for k, v in params.items()
                                                    if v is not None} or None,
                               timeout=timeout)

    async def post(self, path: str, body: Any = None) -> Any:
        return await self.call("POST", path, body)

    async def patch(self, path: str, body: Any) -> Any:
        return await self.call("PATCH", path, body)

    async def put(self, path: str, body: Any) -> Any:
        return await self.call("PUT", path, body)

    async def delete(self, path: str, **params: Any) -> Any:
        return await self.call("DELETE", path, params=params or None)


async def gather(api: Api, paths: Sequence[str], timeout: float = TIMEOUT) -> list[Any]:
    """GET every path side by side; an error becomes the answer at its place."""
    answers: list[Any] = [None] * len(paths)

    async def one(index: int, path: str) -> None:
        try:
            answers[index] = await api.get(path, timeout=timeout)
        except ApplianceError as exc:
            answers[index] = exc

    async with trio.open_nursery() as nursery:
        for index, path in enumerate(paths):
            nursery.start_soon(one, index, path)
    return answers
