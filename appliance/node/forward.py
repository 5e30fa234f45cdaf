"""Requests that belong to another node of the cluster (docs/cluster.md, "Any node
answers").

Every node serves the whole cluster's API. Most requests only read or change desired state
in the store, and any node carries them out. Three kinds belong to one node, and are sent
there as they came (same method, path, query, body and token), with the answer passed back:

- creating a volume, changing or removing a disk, draining a node: placement is the
  **leader**'s (one decision maker, so two nodes never place on the same free space or port);
- requests about a volume attached on another node (detach and delete check its device's
  users, snapshots and expansion talk to its engine): to **the node of its engine**;
- adding a disk of another node (its path is checked there): to **that node**.

A forwarded request carries ``X-Appliance-Forwarded``: it is never forwarded again (the
node it reaches answers, or refuses with 503 when it is no longer the one).
"""

from __future__ import annotations

import hmac
import json
from typing import Any
from urllib.parse import unquote

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.control.objects import NodeAlive, Volume
from appliance.errors import ApplianceError, Unavailable
from appliance.node.nodes import Membership

HEADER = "X-Appliance-Forwarded"
TIMEOUT = 330.0  # seconds: as long as the slowest request a node answers (a waited detach)
ATTACHED_STATES = frozenset({"attaching", "attached", "detaching"})


class Forwarding:
    """ASGI middleware: sends a request that belongs to another node there (see the
    module), and passes every other request to *app*. Only requests with the right token
    are looked at (the others reach *app*, which refuses them)."""

    def __init__(self, app: ASGIApp, membership: Membership, token: str) -> None:
        self.app = app
        self.membership = membership
        self.token = token
        self.name = membership.name
        self.store = membership.store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.membership.config.clustered:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if HEADER.lower() in request.headers or not self._authorised(request):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        try:
            target = await self._target(request.method, request.url.path, body)
        except ApplianceError as exc:
            response: Response = JSONResponse(
                {"error": {"code": exc.code, "message": exc.message}},
                status_code=exc.http_status)
        else:
            if target is None:
                await self.app(scope, _replay(body, receive), send)
                return
            try:
                response = await self._send(request, body, *target)
            except Unavailable as exc:
                if request.method == "GET":  # a read: what the store says, from here
                    await self.app(scope, _replay(body, receive), send)
                    return
                response = JSONResponse({"error": {"code": exc.code, "message": exc.message}},
                                        status_code=exc.http_status)
        await response(scope, receive, send)

    def _authorised(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    async def _target(self, method: str, path: str, body: bytes
                      ) -> tuple[str, str, str] | None:
        """(node, its API address, why) when the request is another node's."""
        parts = path.strip("/").split("/")
        if parts[:2] == ["v1", "volumes"]:
            if len(parts) == 2 and method == "POST":
                return await self._leader("placement is the leader's")
            if len(parts) >= 3 and parts[3:4] != ["attach"]:
                return await self._engine(unquote(parts[2]))
        if parts[:2] == ["v1", "nodes"] and parts[3:] == ["drain"] and method == "POST":
            return await self._leader("placement is the leader's")
        if parts[:2] == ["v1", "disks"]:
            if len(parts) == 3 and method in ("PATCH", "DELETE"):
                return await self._leader("placement is the leader's")
            if len(parts) == 2 and method == "POST":
                node = _field(body, "node")
                if node:
                    return await self._node(node, "the disk is on that node")
        return None

    async def _node(self, node: str, why: str) -> tuple[str, str, str] | None:
        if node == self.name:
            return None
        return node, (await self.membership.node(node)).api, why

    async def _leader(self, why: str) -> tuple[str, str, str] | None:
        if self.membership.is_leader:
            return None
        leader = await self.membership.leader()
        if leader is None:
            raise Unavailable("the cluster has no leader at the moment (an election takes "
                              "up to the node lease time); try again")
        return await self._node(leader, why)

    async def _engine(self, name: str) -> tuple[str, str, str] | None:
        entry = await self.store.get(Volume.key_of(name))
        if entry is None:
            return None  # answered here: not found
        volume = Volume.from_dict(entry.value)
        if volume.node and (volume.attached or volume.state in ATTACHED_STATES) and \
                await self.store.get(NodeAlive.key_of(volume.node)) is not None:
            return await self._node(volume.node, f"volume {name} is attached there")
        return None  # (its node is down: answered here, from the store)

    async def _send(self, request: Request, body: bytes, node: str, api: str,
                    why: str) -> Response:
        headers: dict[str, Any] = {HEADER: self.name}
        for name in ("authorization", "content-type", "accept"):
            if name in request.headers:
                headers[name] = request.headers[name]
        url = f"http://{api}{request.url.path}"
        if request.url.query:
            url += "?" + request.url.query
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                answer = await client.request(request.method, url, headers=headers,
                                              content=body)
        except httpx.HTTPError as exc:
            raise Unavailable(f"node {node} cannot be reached at {api} ({why}): "
                              f"{exc or type(exc).__name__}") from exc
        return Response(answer.content, status_code=answer.status_code,
                        media_type=answer.headers.get("content-type"))


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _field(body: bytes, name: str) -> str | None:
    try:
        value = json.loads(body).get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
