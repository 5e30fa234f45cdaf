"""The replica server's control operations: they run on its pool and may complete out of
order. Each takes the request and its JSON (or empty) payload and returns reply parts."""

from __future__ import annotations

from typing import Any

from appliance.chain import Replica
from appliance.errors import InvalidArgument
from appliance.pace import Pace
from appliance.replication import protocol as proto
from appliance.replication.protocol import Op, Request
from appliance.replication.session import Handler, Parts, Session


def _text(document: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    value = document.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"field {key!r} must be a string")
    return value


def handlers(replica: Replica) -> dict[int, Handler]:

    def flush(session: Session, request: Request, payload: bytes) -> Parts:
        replica.flush()
        return []

    def snapshot(session: Session, request: Request, payload: bytes) -> Parts:
        document = proto.json_object(payload)
        labels = document.get("labels") or {}
        if not isinstance(labels, dict):
            raise InvalidArgument("field 'labels' must be an object")
        replica.snapshot(_text(document, "name"), labels=labels,
                         user_created=bool(document.get("user_created", True)))
        return []

    def remove_snapshot(session: Session, request: Request, payload: bytes) -> Parts:
        replica.remove_snapshot(_text(proto.json_object(payload), "name"))
        return []

    def purge(session: Session, request: Request, payload: bytes) -> Parts:
        return [proto.encode_json(replica.purge())]

    def expand(session: Session, request: Request, payload: bytes) -> Parts:
        replica.expand(request.offset)
        return []

    def revert(session: Session, request: Request, payload: bytes) -> Parts:
        replica.revert(_text(proto.json_object(payload), "name"))
        return []

    def layers(session: Session, request: Request, payload: bytes) -> Parts:
        return [proto.encode_json([layer.as_dict() for layer in replica.layers()])]

    def set_volume_record(session: Session, request: Request, payload: bytes) -> Parts:
        replica.set_volume_record(proto.json_object(payload))
        return []

    def checksum(session: Session, request: Request, payload: bytes) -> Parts:
        document = proto.json_object(payload)
        result = replica.layer_checksum(_text(document, "layer", optional=True))
        reply: dict[str, Any] = {"digest": result.digest, "size": result.size}
        if document.get("chunks"):
            reply["chunks"] = {str(n): digest.hex() for n, digest in result.chunks.items()}
        return [proto.encode_json(reply)]

    def scrub_layer(session: Session, request: Request, payload: bytes) -> Parts:
        document = proto.json_object(payload)
        rate = document.get("rate", 0)
        if not isinstance(rate, int) or isinstance(rate, bool) or rate < 0:
            raise InvalidArgument("field 'rate' must be a number of bytes per second")
        stored, damaged = replica.scrub_layer(_text(document, "layer"),
                                              Pace(rate, session.ended))
        return [proto.encode_json({
            "digest": stored.digest, "damaged": damaged,
            "chunks": {str(n): digest.hex() for n, digest in stored.chunks.items()}})]

    def repair_chunk(session: Session, request: Request, payload: bytes) -> Parts:
        header, _, data = bytes(payload).partition(b"\n")
        document = proto.json_object(header)
        bitmap = document.get("bitmap")
        if not isinstance(bitmap, str):
            raise InvalidArgument("field 'bitmap' must be a hex string")
        try:
            allocated = int(bitmap, 16)
        except ValueError:
            raise InvalidArgument("field 'bitmap' must be a hex string") from None
        replica.repair_chunk(_text(document, "layer"), request.offset, allocated, data)
        return []

    def set_revision(session: Session, request: Request, payload: bytes) -> Parts:
        replica.set_revision(request.offset)
        return []

    return {
        Op.FLUSH: flush, Op.SNAPSHOT: snapshot, Op.REMOVE_SNAPSHOT: remove_snapshot,
        Op.PURGE: purge, Op.EXPAND: expand, Op.REVERT: revert, Op.LAYERS: layers,
        Op.SET_VOLUME_RECORD: set_volume_record, Op.CHECKSUM: checksum,
        Op.SET_REVISION: set_revision, Op.SCRUB_LAYER: scrub_layer,
        Op.REPAIR_CHUNK: repair_chunk,
    }
