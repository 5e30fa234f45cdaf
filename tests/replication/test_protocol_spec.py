"""The examples in docs/replica-protocol.md, decoded and re-encoded byte for byte."""

from __future__ import annotations

import errno
import re
from pathlib import Path

from appliance.replication import protocol as proto
from appliance.replication.protocol import FLAG_FUA, Op, Role

SPEC = Path(__file__).resolve().parents[2] / "docs" / "replica-protocol.md"
SECRET = b"example-secret-0123456789"
SERVER_NONCE, CLIENT_NONCE = bytes(range(32)), bytes(range(32, 64))
REPLICA_ID = "5f0c2a9e-3b1d-4c55-9a0e-2f7d8c1b6e44"


def example(name: str) -> bytes:
    match = re.search(rf"<!-- example: {name} -->\n```\w*\n(.*?)```", SPEC.read_text(), re.S)
    assert match, name
    return bytes.fromhex(match.group(1).replace("\n", " "))


def test_request_and_replies() -> None:
    request = proto.decode_request(example("request"))
    assert (request.op, request.flags, request.id, request.offset, request.payload_length) == \
        (Op.WRITE, FLAG_FUA, 7, 8192, 4096)
    assert proto.encode_request(Op.WRITE, 7, 8192, 4096, FLAG_FUA, 4096) == example("request")
    assert proto.decode_response(example("response")) == proto.Response(Op.WRITE, 0, 7, 0)
    failed = proto.decode_response(example("error"))
    assert (failed.op, failed.error, failed.id, failed.payload_length) == \
        (Op.READ, errno.ENOSPC, 9, 12)


def test_handshake_proofs() -> None:
    magic, version, _reserved, nonce = proto.HELLO.unpack(example("hello"))
    assert (magic, version, nonce) == (proto.HELLO_MAGIC, 1, SERVER_NONCE)
    client_nonce, role, generation, token, proof = proto.AUTH.unpack(example("auth"))
    assert (client_nonce, role, generation, token) == (CLIENT_NONCE, Role.WRITER, 5,
                                                        0x1122334455667788)
    assert proof == proto.client_proof(SECRET, SERVER_NONCE, CLIENT_NONCE, role, 5, token)
    assert proof != proto.client_proof(b"other", SERVER_NONCE, CLIENT_NONCE, role, 5, token)
    welcome = proto.decode_welcome(example("welcome"))
    assert (welcome.status, welcome.generation, welcome.revision, welcome.size,
            welcome.replica_id) == (0, 5, 1234, 1 << 30, REPLICA_ID)
    assert welcome.proof == proto.server_proof(SECRET, CLIENT_NONCE, SERVER_NONCE, 0, 5, 1234,
                                               1 << 30, proto.replica_id_bytes(REPLICA_ID))
    # a proof binds every field: another revision gives another proof
    assert welcome.proof != proto.server_proof(SECRET, CLIENT_NONCE, SERVER_NONCE, 0, 5, 1235,
                                               1 << 30, proto.replica_id_bytes(REPLICA_ID))
