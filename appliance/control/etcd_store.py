"""The state store on etcd (v3), for nodes that form a cluster.

Spoken through etcd's JSON gateway (``/v3/kv/...``, ``/v3/watch``, ``/v3/lease/...``) with
httpx, which the daemon already uses and which runs on trio: no asyncio-only client
(aetcd) and no gRPC stubs in worker threads. Keys and values are base64 on the wire;
values are JSON objects. Revisions are etcd's (store-wide, as the interface wants); an
entry's ``revision`` is its ``mod_revision`` and ``created`` its ``create_revision``.
Compare-and-swap is a transaction comparing the key's ``mod_revision`` (0: absent). A
watch is one streaming request; a revision older than etcd's compaction is reported as
:class:`~appliance.control.store.Compacted`. Leases are etcd's (whole seconds, at least
:data:`MIN_TTL`); etcd expires them, so :meth:`EtcdStore.run` has nothing to do.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from appliance.control.store import Compacted, Entry, Event, StateStore
from appliance.errors import Conflict, InvalidArgument, NotFound, Unavailable

MIN_TTL = 2  # seconds: etcd refuses shorter leases (1.5 election timeouts)
TIMEOUT = 10.0  # seconds for one request (a watch waits as long as it is open)
#: what etcd answers while its members elect a leader: worth asking again shortly
ELECTION_SIGNS = ("leader changed", "no leader")
ELECTION_WAIT = 3.0  # seconds a request is tried again meanwhile (a few election timeouts)
ELECTION_PAUSE = 0.2


class FutureRevision(Unavailable):
    """A revision etcd has not reached yet."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(data: str) -> str:
    return base64.b64decode(data).decode()


def _check_key(key: str) -> str:
    if not key.startswith("/") or "\0" in key or len(key) > 1024:
        raise InvalidArgument(f"invalid store key {key[:60]!r}")
    return key


def _range_end(prefix: str) -> str:
    """The key just past every key that starts with *prefix* (etcd's prefix range)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return base64.b64encode(b"\0").decode()
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


def _entry(kv: dict[str, Any]) -> Entry:
    lease = int(kv.get("lease", 0))
    return Entry(_text(kv["key"]), json.loads(_text(kv.get("value", ""))),
                 int(kv["mod_revision"]), int(kv["create_revision"]), lease or None)


class _Events:
    """The events of a watch (an error of the stream is raised where it is met)."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Event | BaseException]) -> None:
        self._receive = receive

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> Event:
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if isinstance(item, BaseException):
            raise item
        return item


class EtcdStore(StateStore):
    """The store on the members of one etcd cluster at *endpoints* (``http[s]://HOST:PORT``):
    requests go to one member; when it cannot be reached, to the next (a member that is
    cut off, or down, costs one failed connection, not the cluster)."""

    def __init__(self, client: httpx.AsyncClient, endpoints: Sequence[str]) -> None:
        if not endpoints:
            raise InvalidArgument("no etcd endpoint given")
        self._client = client
        self._endpoints = [endpoint.rstrip("/") for endpoint in endpoints]
        self._current = 0

    @property
    def endpoint(self) -> str:
        """The member requests go to now."""
        return self._endpoints[self._current]

    @classmethod
    async def open(cls, endpoints: str | Sequence[str], *, ca: str | None = None,
                   cert: tuple[str, str] | None = None) -> EtcdStore:
        """A store on the etcd members at *endpoints* (a list, or one string with commas),
        with the CA file *ca* and the client certificate and key *cert* for TLS."""
        if isinstance(endpoints, str):
            endpoints = [part for part in endpoints.split(",") if part]
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(*cert)
        client = httpx.AsyncClient(timeout=TIMEOUT, verify=context)
        store = cls(client, endpoints)
        try:
            await store._call("/v3/maintenance/status", {})
        except BaseException:
            await client.aclose()
            raise
        return store

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST to the current member, or to the next ones when it cannot be reached."""
        errors = []
        for _ in range(len(self._endpoints)):
            endpoint = self.endpoint
            try:
                return await self._client.post(endpoint + path, json=body)
            except httpx.TransportError as exc:
                errors.append(f"{endpoint}: {exc or type(exc).__name__}")
                if self._current == len(self._endpoints) - 1:
                    self._current = 0
                else:
                    self._current += 1
            except httpx.HTTPError as exc:
                errors.append(f"{endpoint}: {exc or type(exc).__name__}")
                break
        raise Unavailable(f"etcd cannot be reached ({'; '.join(errors)}); the cluster's state "
                          "store needs a quorum of its members")

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request; while the members elect a leader (a member came back, the leader
        moved) it is tried again for up to ELECTION_WAIT seconds."""
        deadline = trio.current_time() + ELECTION_WAIT
        while True:
            response = await self._post(path, body)
            answer: dict[str, Any] = response.json() if response.content else {}
            message = str(answer.get("error") or answer.get("message") or "")
            if response.status_code == 200 or not any(
                    sign in message for sign in ELECTION_SIGNS) or \
                    trio.current_time() >= deadline:
                break
            await trio.sleep(ELECTION_PAUSE)
        if response.status_code != 200:
            message = str(answer.get("error") or answer.get("message") or response.text)
            if "requested lease not found" in message:
                raise NotFound(f"lease does not exist or expired: {message}")
            if "has been compacted" in message:
                raise Compacted(f"etcd no longer has that revision: {message}")
            if "future revision" in message:
                raise FutureRevision(message)
            if "timed out" in message or "no leader" in message:
                raise Unavailable(f"etcd has no quorum ({message}): the cluster's state "
                                  "store needs a majority of its members")
            raise Unavailable(f"etcd answered {response.status_code}: {message}")
        return answer

    async def get(self, key: str) -> Entry | None:
        answer = await self._call("/v3/kv/range", {"key": _b64(_check_key(key))})
        kvs = answer.get("kvs") or []
        return _entry(kvs[0]) if kvs else None

    async def list(self, prefix: str) -> tuple[list[Entry], int]:
        answer = await self._call("/v3/kv/range", {"key": _b64(prefix),
                                                   "range_end": _range_end(prefix),
                                                   "sort_order": "ASCEND",
                                                   "sort_target": "KEY"})
        return [_entry(kv) for kv in answer.get("kvs") or []], \
            int(answer["header"]["revision"])

    async def _txn(self, key: str, expect: int | None,
                   operation: dict[str, Any]) -> dict[str, Any]:
        compare = [] if expect is None else [{"key": _b64(key), "target": "MOD",
                                               "result": "EQUAL", "mod_revision": expect}]
        answer = await self._call("/v3/kv/txn", {
            "compare": compare, "success": [operation],
            "failure": [{"request_range": {"key": _b64(key)}}]})
        if not answer.get("succeeded"):
            kvs = answer["responses"][0]["response_range"].get("kvs") or []
            current = int(kvs[0]["mod_revision"]) if kvs else 0
            raise Conflict(f"{key} changed (revision {current}, expected {expect})")
        return answer

    async def put(self, key: str, value: dict[str, Any], *, expect: int | None = None,
                  lease: int | None = None) -> int:
        _check_key(key)
        if not isinstance(value, dict):
            raise InvalidArgument("a stored value is a JSON object")
        request: dict[str, Any] = {"key": _b64(key), "value": _b64(json.dumps(value))}
        if lease:
            request["lease"] = lease
        answer = await self._txn(key, expect, {"request_put": request})
        return int(answer["header"]["revision"])

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        answer = await self._txn(_check_key(key), expect,
                                 {"request_delete_range": {"key": _b64(key)}})
        deleted = answer["responses"][0]["response_delete_range"].get("deleted", 0)
        return int(deleted) > 0

    @asynccontextmanager
    async def watch(self, prefix: str, after: int) -> AsyncIterator[AsyncIterator[Event]]:
        # etcd tells a compacted start only after the watch is created: asked first
        with contextlib.suppress(FutureRevision):  # nothing after it yet: nothing to replay
            await self._call("/v3/kv/range", {"key": _b64(prefix),
                                              "range_end": _range_end(prefix),
                                              "revision": after + 1, "count_only": True})
        send, receive = trio.open_memory_channel[Event | BaseException](math.inf)
        started = trio.Event()
        failure: list[BaseException] = []

        async def stream() -> None:
            body = {"create_request": {"key": _b64(prefix), "range_end": _range_end(prefix),
                                       "start_revision": after + 1}}
            try:
                async with self._client.stream("POST", self.endpoint + "/v3/watch", json=body,
                                               timeout=None) as response:
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        result = json.loads(line).get("result", {})
                        if int(result.get("compact_revision", 0)):
                            raise Compacted(f"revision {after} is older than etcd's history "
                                            f"(compacted at {result['compact_revision']})")
                        started.set()
                        for raw in result.get("events") or []:
                            kv = raw["kv"]
                            kind = "delete" if raw.get("type") == "DELETE" else "put"
                            await send.send(Event(kind, _text(kv["key"]),
                                                  int(kv["mod_revision"]),
                                                  _entry(kv) if kind == "put" else None))
            except (Compacted, httpx.HTTPError) as exc:
                failure.append(exc if isinstance(exc, Compacted) else Unavailable(
                    f"the watch of {prefix} on etcd broke: {exc}"))
                started.set()
                await send.send(failure[0])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            with trio.fail_after(TIMEOUT):
                await started.wait()  # the watch is registered (or refused)
            if failure:
                raise failure[0]
            try:
                yield _Events(receive)
            finally:
                nursery.cancel_scope.cancel()

    async def grant_lease(self, ttl: float) -> int:
        if not 0 < ttl <= 86400:
            raise InvalidArgument(f"invalid lease time {ttl}")
        answer = await self._call("/v3/lease/grant", {"TTL": max(MIN_TTL, math.ceil(ttl))})
        return int(answer["ID"])

    async def keep_alive(self, lease: int) -> None:
        answer = await self._call("/v3/lease/keepalive", {"ID": lease})
        if int(answer.get("result", {}).get("TTL", 0)) <= 0:
            raise NotFound(f"lease {lease} does not exist or expired")

    async def revoke(self, lease: int) -> None:
        await self._call("/v3/lease/revoke", {"ID": lease})

    async def run(self) -> None:
        await trio.sleep_forever()  # etcd expires leases itself

    async def aclose(self) -> None:
        await self._client.aclose()
