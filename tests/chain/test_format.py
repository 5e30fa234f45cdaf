"""The replica format: metadata encoding and validation, the state record, checksum files,
and the examples in docs/replica-format.md."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from appliance.chain import checksum, state
from appliance.chain import format as fmt
from appliance.chain.format import Layer, Metadata
from appliance.errors import Corruption, InvalidArgument

SPEC = Path(__file__).resolve().parents[2] / "docs" / "replica-format.md"


def spec_example(name: str) -> str:
    text = SPEC.read_text()
    match = re.search(rf"<!-- example: {name} -->\n```\w*\n(.*?)```", text, re.S)
    assert match, f"example {name} missing from the spec"
    return match.group(1)


def hex_example(name: str) -> bytes:
    return bytes.fromhex(spec_example(name).replace("\n", " "))


def sample() -> Metadata:
    return Metadata(replica_id="r", size=1 << 20, head=2, next_layer_id=3, layers={
        1: Layer(1, None, 1 << 20, name="s1", created="2026-01-01T00:00:00Z"),
        2: Layer(2, 1, 1 << 20)})


def reencode(document: dict[str, object]) -> bytes:
    """Encode a hand-edited document with a valid digest, to test the structural checks."""
    document = {k: v for k, v in document.items() if k != "digest"}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    document["digest"] = "sha256:" + hashlib.sha256(canonical).hexdigest()
    return json.dumps(document).encode()


def test_spec_metadata_example_decodes() -> None:
    meta = fmt.decode(spec_example("metadata").encode())
    assert meta.size == 1 << 30 and meta.head == 3 and meta.serial == 7
    assert [x.name for x in meta.ancestry(meta.head)] == ["base", "hourly-0900", None]
    assert meta.layers[2].removed and not meta.layers[2].user_created
    assert meta.layers[1].labels == {"app": "db"}
    assert fmt.encode(meta).decode() == spec_example("metadata")


def test_spec_state_example_decodes() -> None:
    assert state.decode_record(hex_example("state")) == (3, 1234)
    assert state.encode_record(3, 1234) == hex_example("state")


def test_spec_checksum_example_decodes() -> None:
    decoded = checksum.decode(hex_example("checksum"), "example")
    assert decoded.size == 1 << 20 and decoded.chunks == {0: bytes(range(32))}
    assert decoded.digest == ("sha256:7d76542a0917270b2e13e5769ee8dee4e6a5c9a266e0d81d5a1de3b"
                              "fe6802836")


def test_roundtrip_and_serial() -> None:
    meta = sample()
    assert fmt.decode(fmt.encode(meta)) == meta
    assert meta.evolve().serial == meta.serial + 1


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(size=1000), "invalid volume size"),
    (lambda d: d.update(head=9), "head layer 9 is not listed"),
    (lambda d: d["layers"][0].update(parent=2), "is the head"),
    (lambda d: d["layers"][1].update(parent=7), "parent 7 does not exist"),
    (lambda d: d["layers"][1].update(name="x"), "head must be unnamed"),
    (lambda d: d["layers"][0].update(name=None), "without a name"),
    (lambda d: d["layers"][0].update(name="../x"), "invalid snapshot name"),
    (lambda d: d["layers"].append({**d["layers"][0], "id": 0, "name": "s0", "parent": 1,
                                   "size": 4096}), "smaller than its parent"),
    (lambda d: d.update(next_layer_id=2), "not below next_layer_id"),
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (lambda d: d.update(format="other"), "not an appliance replica"),
    (lambda d: d.update(extra=1), "unknown field 'extra'"),
    (lambda d: d["layers"][0].update(size="big"), "wrong type"),
    (lambda d: d["layers"][0].update(removed=1), "wrong type"),
    (lambda d: d["layers"].append(dict(d["layers"][0])), "appears twice"),
    (lambda d: d.update(pending={"op": "coalesce", "parent": 1, "child": 2, "into": 1}),
     "pending coalesce does not match"),
])
def test_structural_damage_is_named(edit, message: str) -> None:
    document = json.loads(fmt.encode(sample()))
    edit(document)
    with pytest.raises(Corruption, match=re.escape(message)):
        fmt.decode(reencode(document))


def test_cycle_is_refused() -> None:
    document = json.loads(fmt.encode(sample()))
    document["layers"].append({**document["layers"][0], "id": 0, "name": "s0", "parent": 1})
    document["layers"][0]["parent"] = 0
    with pytest.raises(Corruption, match="cycle"):
        fmt.decode(reencode(document))


def test_flipped_character_is_caught_by_the_digest() -> None:
    data = fmt.encode(sample()).replace(b'"size": 1048576', b'"size": 1048577', 1)
    with pytest.raises(Corruption, match="digest mismatch"):
        fmt.decode(data)
    with pytest.raises(Corruption, match="not valid JSON"):
        fmt.decode(b"{")


@pytest.mark.parametrize("name", ["a", "snap-1", "2026.11.27_hourly", "x" * 128])
def test_valid_names(name: str) -> None:
    assert fmt.check_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", "-x", "a\0b", "x" * 129, "a b", "é",
                                  "../etc", "name\n"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="snapshot name"):
        fmt.check_name(name)


def test_labels_and_sizes() -> None:
    assert fmt.check_labels({"app": "db", "k8s.io/name": "x"}) == {"app": "db",
                                                                   "k8s.io/name": "x"}
    for labels in ({"": "x"}, {"a b": "x"}, {"k": "\n"}, {"k": "v" * 300},
                   {f"k{n}": "v" for n in range(65)}):
        with pytest.raises(InvalidArgument):
            fmt.check_labels(labels)
    for size, message in ((0, "positive"), (-4096, "positive"), (4097, "multiple"),
                          (fmt.MAX_SIZE + 4096, "limit")):
        with pytest.raises(InvalidArgument, match=message):
            fmt.check_size(size)


def test_state_record_survives_one_damaged_copy() -> None:
    page = bytearray(state.STATE_SIZE)
    page[0:36] = state.encode_record(2, 10)
    page[2048:2084] = state.encode_record(2, 10)
    page[20] ^= 0xFF  # damage the first copy
    assert state.best_record(bytes(page)) == (2, 10)
    page[2048 + 20] ^= 0xFF
    with pytest.raises(Corruption, match="both copies"):
        state.best_record(bytes(page))


def test_checksum_file_damage_is_detected() -> None:
    data = bytearray(hex_example("checksum"))
    data[-1] ^= 1
    with pytest.raises(Corruption, match="do not match"):
        checksum.decode(bytes(data), "x")
    with pytest.raises(Corruption, match="truncated"):
        checksum.decode(bytes(data[:10]), "x")
    with pytest.raises(Corruption, match="bytes where"):
        checksum.decode(bytes(data[:-1]), "x")
