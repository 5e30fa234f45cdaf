"""The engine's data-path connection (client.Pipeline): many threads, many requests in
flight, replies matched by id, and no request ever completing without its reply.

The far end is a real socket speaking the replica protocol's framing, driven by the test so
that it can reorder replies, fail one, stop answering or close in the middle of a reply."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import pytest

from appliance.errors import NoSpace, Unavailable
from appliance.replication import protocol as proto
from appliance.replication.client import Pipeline, ReplicaConnection
from appliance.replication.protocol import Op


class Ends:
    """A connected pair: the client's end (given to a Pipeline) and the server's end."""

    def __init__(self, timeout: float) -> None:
        self.client, self.server = socket.socketpair()
        self.name = "test-replica"
        self.timeout = timeout
        self.sock = self.client
        self.reader = proto.BufferedReader(self.server)

    def close(self) -> None:
        self.client.close()

    def request(self) -> tuple[proto.Request, bytes]:
        request = proto.decode_request(self.reader.read(proto.REQUEST.size))
        return request, bytes(self.reader.read(request.payload_length))

    def reply(self, request: proto.Request, payload: bytes = b"", error: int = 0) -> None:
        self.server.sendall(proto.encode_response(request.op, request.id, error,
                                                  len(payload)) + payload)


@pytest.fixture
def ends() -> Iterator[Ends]:
    pair = Ends(timeout=5.0)
    yield pair
    pair.server.close()
    pair.client.close()


def pipeline(ends: Ends) -> Pipeline:
    return Pipeline(cast(ReplicaConnection, ends))


def test_replies_in_any_order_reach_their_requests(ends: Ends) -> None:
    pipe = pipeline(ends)
    count = 64

    def serve() -> None:
        batch: list[proto.Request] = []
        for _ in range(count):
            request, _ = ends.request()
            batch.append(request)
            if len(batch) == 8:  # answer each batch of eight in reverse order
                for pending in reversed(batch):
                    ends.reply(pending, pending.offset.to_bytes(8, "big") * 512)
                batch.clear()
        for pending in reversed(batch):
            ends.reply(pending, pending.offset.to_bytes(8, "big") * 512)

    def read(offset: int) -> bytes:
        buf = bytearray(4096)
        pipe.call(Op.READ, offset, 4096, into=memoryview(buf))
        return bytes(buf)

    server = threading.Thread(target=serve)
    server.start()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(read, range(count)))
    server.join()
    assert results == [n.to_bytes(8, "big") * 512 for n in range(count)]


def test_a_reported_error_fails_its_request_only(ends: Ends) -> None:
    pipe = pipeline(ends)
    first = pipe.submit(Op.WRITE, 0, 4, payload=b"abcd")
    second = pipe.submit(Op.WRITE, 4, 4, payload=b"efgh")
    request, payload = ends.request()
    assert payload == b"abcd"
    ends.reply(request, b"disk full", error=proto.error_code(NoSpace("x")))
    request, _ = ends.request()
    ends.reply(request)
    with pytest.raises(NoSpace, match="disk full"):
        pipe.wait(first)
    assert pipe.wait(second) == b""
    assert not pipe.broken
    third = pipe.submit(Op.PING)
    request, _ = ends.request()
    ends.reply(request)
    assert pipe.wait(third) == b""


def test_a_connection_closed_in_a_reply_fails_every_request(ends: Ends) -> None:
    """Closed after half of the first reply's data: no request may complete as if it had
    its data (a read would return a buffer never filled)."""
    pipe = pipeline(ends)
    buffers = [bytearray(4096) for _ in range(8)]
    slots = [pipe.submit(Op.READ, n * 4096, 4096, into=memoryview(b))
             for n, b in enumerate(buffers)]
    requests = [ends.request()[0] for _ in slots]
    header = proto.encode_response(Op.READ, requests[0].id, 0, 4096)
    ends.server.sendall(header + b"x" * 2048)
    ends.server.close()
    # The first request's thread receives (nobody else waits): it reads the header of its
    # own reply, then the end of the stream.
    with pytest.raises(Unavailable):
        pipe.wait(slots[0])
    assert buffers[0] == bytes(4096)
    outcomes: list[BaseException | bytes] = []

    def wait(slot: object) -> None:
        try:
            outcomes.append(pipe.wait(slot))  # type: ignore[arg-type]
        except Unavailable as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=wait, args=(slot,)) for slot in slots[1:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(outcomes) == 7
    assert all(isinstance(outcome, Unavailable) for outcome in outcomes), outcomes
    assert pipe.broken
    with pytest.raises(Unavailable):
        pipe.submit(Op.PING)


def test_a_reply_that_does_not_come_times_out(ends: Ends) -> None:
    ends.timeout = 0.5
    pipe = pipeline(ends)
    proto.set_timeout(ends.client, 0.5)
    slot = pipe.submit(Op.FLUSH)
    ends.request()  # received, never answered
    with pytest.raises(Unavailable, match="timed out"):
        pipe.wait(slot)
    assert pipe.broken
