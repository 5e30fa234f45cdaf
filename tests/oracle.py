#!/usr/bin/python3
"""Acknowledgement oracle: an NBD client that knows exactly which writes were acknowledged,
and a judge that later tells a lost acknowledged write from an unacknowledged one.

Run with Debian's interpreter, which has libnbd's Python module (python3-libnbd)::

    /usr/bin/python3 tests/oracle.py write --uri URI --offset 0 --size 64M --journal J --seconds 10
    /usr/bin/python3 tests/oracle.py verify --uri URI --journal J

This module imports only the standard library at the top (``nbd`` is imported when a
connection is opened), so the test suite can import it to compute block contents.

Block format
------------
The region is cut into 4096-byte blocks. Every block of every write describes itself: a
40-byte little-endian header followed by 4056 bytes of filler::

    0   8  magic      b"APLACK01"
    8   8  offset     the block's byte offset in the volume
    16  8  seq        the write's sequence number: 1, 2, ... in issue order, per run
    24  8  run        a random id chosen for each workload (a journal names its run)
    32  4  index      the block's index inside its write (0 .. count-1)
    36  4  count      how many blocks the write covers
    40  4056 filler   shake_128(pack("<QQQ", run, seq, offset)).digest(4056)

so (run, seq, offset) gives back the exact 4096 bytes a block must hold.

A workload keeps ``--queue-depth`` writes in flight, never two touching the same block: the
writes to one block are totally ordered by seq. Each write ends ``acked`` (completed with
no error), ``failed`` (the server replied with an error) or ``unknown`` (no reply: still in
flight at the end, the connection died (libnbd's ENOTCONN), or the server stopped replying).

Journal (JSON, written atomically)
----------------------------------
``{"format": "aplack-journal/1", "run": "<16 hex>", "offset": O, "size": S,
"block_size": 4096, "initial": "<32 hex digits per block: blake2b-128 of its content
before the workload>", "writes": [[seq, offset, count, outcome, error|null], ...],
"summary": {...}}``, writes in seq order.

Judging rule
------------
Per block take the writes to it in seq order and let k be the last acknowledged one.
The block may hold write k or any later (unacknowledged) write; if no write to it was
acknowledged, its initial content or any of its writes. A block holding an *earlier*
version (an older write, or the initial content) is **lost**: an acknowledged write is
missing. A block matching none of its known versions (torn, garbage, another offset's or
another run's data) is **foreign**. Any lost or foreign block makes ``verify`` exit 1.

Exit codes: 0 done (``write`` exits 0 even when writes failed: failures are data),
1 ``verify`` found lost or foreign blocks, 2 usage error, 3 the tool itself broke.
"""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import importlib
import json
import os
import random
import secrets
import signal
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCK = 4096
MAGIC = b"APLACK01"
HEADER = struct.Struct("<8sQQQII")  # magic, offset, seq, run, index, count
FILLER = BLOCK - HEADER.size
KEY = struct.Struct("<QQQ")  # run, seq, offset: what the filler is derived from
JOURNAL_FORMAT = "aplack-journal/1"
READ_CHUNK = 4 << 20
POLL_SECONDS = 0.1
PROGRESS_SECONDS = 0.2
EXAMPLES = 20


class OracleError(Exception):
    """The tool could not do its job (exit 3)."""


class ConnectionDied(OracleError):
    """The NBD connection broke."""


class NoReply(OracleError):
    """The server did not answer within the I/O timeout."""


# ---- block format ---------------------------------------------------------------------

def block_content(run: int, seq: int, offset: int, index: int, count: int) -> bytes:
    """The exact 4096 bytes block *index* of write *seq* puts at volume *offset*."""
    filler = hashlib.shake_128(KEY.pack(run, seq, offset)).digest(FILLER)
    return HEADER.pack(MAGIC, offset, seq, run, index, count) + filler


def write_payload(run: int, seq: int, offset: int, count: int) -> bytes:
    return b"".join(block_content(run, seq, offset + i * BLOCK, i, count)
                    for i in range(count))


def block_digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


# ---- connection -----------------------------------------------------------------------

class Connection:
    """One libnbd handle; every wait on it is bounded by *timeout* seconds."""

    def __init__(self, uri: str, timeout: float) -> None:
        try:  # Debian's python3-libnbd, only there for /usr/bin/python3
            self.nbd: Any = importlib.import_module("nbd")
        except ImportError as error:
            raise OracleError("no libnbd Python module: install python3-libnbd and run "
                              "this with /usr/bin/python3") from error
        self.timeout = timeout
        self.handle: Any = self.nbd.NBD()
        try:
            self.handle.aio_connect_uri(uri)
        except self.nbd.Error as error:
            raise OracleError(f"cannot connect to {uri}: {error.string}") from error
        self.wait(self.handle.aio_is_ready, f"connecting to {uri}")
        self.size: int = self.handle.get_size()

    def poll(self, seconds: float) -> None:
        """Let the connection progress for up to *seconds*; completions run callbacks."""
        try:
            self.handle.poll(max(1, int(seconds * 1000)))
        except self.nbd.Error as error:
            raise ConnectionDied(f"{error.errno}: {error.string}") from error

    def wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoReply(f"{what}: no reply within {self.timeout} s")
            self.poll(min(remaining, POLL_SECONDS))

    def read(self, offset: int, size: int) -> Iterator[tuple[int, bytearray]]:
        """The region in chunks of up to 4 MiB: (offset, data)."""
        for start in range(offset, offset + size, READ_CHUNK):
            yield start, self.read_chunk(start, min(READ_CHUNK, offset + size - start))

    def read_chunk(self, offset: int, size: int) -> bytearray:
        data = bytearray(size)
        errors: list[int] = []

        def completed(err: Any) -> int:
            errors.append(err.value)
            return 1

        self.handle.aio_pread(data, offset, completed)
        self.wait(lambda: bool(errors), f"reading at {offset}")
        if errors[0]:
            raise OracleError(f"read at {offset} failed: {errno.errorcode.get(errors[0])}")
        return data

    def close(self) -> None:
        """Drop the handle: libnbd closes the socket (the bindings have no close())."""
        self.handle = None


def initial_digests(conn: Connection, offset: int, size: int) -> bytes:
    digests = bytearray()
    for _, data in conn.read(offset, size):
        view = memoryview(data)
        for at in range(0, len(data), BLOCK):
            digests += block_digest(view[at:at + BLOCK])
    return bytes(digests)


# ---- write workload -------------------------------------------------------------------

@dataclass(slots=True)
class Write:
    seq: int
    offset: int
    count: int
    outcome: str | None = None  # acked, failed, unknown
    error: str | None = None


@dataclass(frozen=True)
class Limits:
    queue_depth: int
    max_blocks: int
    seconds: float | None
    writes: int | None
    rate: float | None
    io_timeout: float
    drain_seconds: float


class Workload:
    """Random whole-block writes over the region, queue_depth in flight, none overlapping."""

    def __init__(self, conn: Connection, offset: int, size: int, limits: Limits,
                 seed: int | None, progress: Path | None) -> None:
        self.conn, self.offset, self.limits, self.progress = conn, offset, limits, progress
        self.blocks = size // BLOCK
        self.run = secrets.randbits(63)
        self.rng = random.Random(seed)
        self.busy = bytearray(self.blocks)  # 1 while an in-flight write covers the block
        self.in_flight: dict[int, tuple[Write, bytes]] = {}
        self.writes: list[Write] = []
        self.stopped: str | None = None
        self.died: str | None = None
        self.signals = 0
        self.started = self.last_progress = self.next_issue = time.monotonic()
        self.progress_at = 0.0

    def run_all(self) -> None:
        self.started = self.last_progress = self.next_issue = time.monotonic()
        self.check_limits()
        while self.stopped is None:
            self.fill()
            self.pump(self.poll_seconds())
            self.check_limits()
            self.report_progress()
        self.drain()
        self.report_progress(force=True)

    def fill(self) -> None:
        while len(self.in_flight) < self.limits.queue_depth and self.may_issue():
            picked = self.pick()
            if picked is None:
                return
            self.issue(*picked)

    def may_issue(self) -> bool:
        if self.stopped or (self.limits.writes and len(self.writes) >= self.limits.writes):
            return False
        return not self.limits.rate or time.monotonic() >= self.next_issue

    def pick(self) -> tuple[int, int] | None:
        """A random free range (first block, count), or None if tries kept hitting busy ones."""
        for _ in range(8):
            count = self.rng.randint(1, min(self.limits.max_blocks, self.blocks))
            first = self.rng.randrange(self.blocks - count + 1)
            if 1 not in self.busy[first:first + count]:
                return first, count
        return None

    def issue(self, first: int, count: int) -> None:
        write = Write(len(self.writes) + 1, self.offset + first * BLOCK, count)
        payload = write_payload(self.run, write.seq, write.offset, count)
        if not self.in_flight:
            self.last_progress = time.monotonic()
        self.writes.append(write)
        self.busy[first:first + count] = b"\1" * count
        self.in_flight[write.seq] = (write, payload)  # libnbd may complete it at once
        try:
            self.conn.handle.aio_pwrite(payload, write.offset,
                                        functools.partial(self.complete, write, first))
        except self.conn.nbd.Error as error:  # never sent: not part of the history
            self.writes.pop()
            self.busy[first:first + count] = bytes(count)
            del self.in_flight[write.seq]
            self.died, self.stopped = f"{error.errno}: {error.string}", "connection died"
            return
        if self.limits.rate:
            interval = 1 / self.limits.rate
            self.next_issue = max(self.next_issue + interval, time.monotonic() - interval)

    def complete(self, write: Write, first: int, err: Any) -> int:
        """libnbd's completion callback; returning 1 retires the command."""
        self.busy[first:first + write.count] = bytes(write.count)
        self.in_flight.pop(write.seq, None)
        self.last_progress = time.monotonic()
        if write.outcome is None:
            code = err.value
            write.outcome = ("acked" if code == 0 else
                             "unknown" if code == errno.ENOTCONN else "failed")
            write.error = errno.errorcode.get(code, str(code)) if code else None
        return 1

    def poll_seconds(self) -> float:
        if self.limits.rate and len(self.in_flight) < self.limits.queue_depth:
            return min(POLL_SECONDS, max(0.001, self.next_issue - time.monotonic()))
        return POLL_SECONDS

    def pump(self, seconds: float) -> None:
        """Poll once; a dead connection or a server that stopped replying ends the run."""
        try:
            self.conn.poll(seconds)
        except ConnectionDied as error:
            self.died, self.stopped = str(error), "connection died"
            return
        silent = time.monotonic() - self.last_progress
        if self.in_flight and silent > self.limits.io_timeout:
            self.died, self.stopped = f"no reply for {silent:.1f} s", "no reply"
            self.abandon("ETIMEDOUT")

    def check_limits(self) -> None:
        if self.stopped:
            return
        elapsed = time.monotonic() - self.started
        if self.signals:
            self.stopped = "signal"
        elif self.limits.seconds is not None and elapsed >= self.limits.seconds:
            self.stopped = "seconds"
        elif self.limits.writes and len(self.writes) >= self.limits.writes:
            self.stopped = "writes"

    def drain(self) -> None:
        """Wait (bounded) for the writes still in flight; whatever remains is unknown."""
        budget = self.limits.drain_seconds if self.signals else self.limits.io_timeout
        deadline = time.monotonic() + budget
        while self.in_flight and self.died is None and self.signals < 2:
            if time.monotonic() >= deadline:
                break
            self.pump(min(POLL_SECONDS, deadline - time.monotonic()))
        self.abandon("in flight at the end")

    def abandon(self, reason: str) -> None:
        for write, _ in self.in_flight.values():
            write.outcome, write.error = "unknown", reason
        self.in_flight.clear()

    def on_signal(self, signum: int, frame: object) -> None:
        self.signals += 1

    def report_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is None or (not force and now - self.progress_at < PROGRESS_SECONDS):
            return
        self.progress_at = now
        write_atomically(self.progress, json.dumps(self.counts()).encode(), durable=False)

    def counts(self) -> dict[str, int]:
        outcomes = Counter(w.outcome or "in_flight" for w in self.writes)
        return {"issued": len(self.writes), "acked": outcomes["acked"],
                "failed": outcomes["failed"], "unknown": outcomes["unknown"],
                "in_flight": outcomes["in_flight"]}

    def summary(self, journal: Path) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        acked = [w for w in self.writes if w.outcome == "acked"]
        errors = Counter(w.error for w in self.writes if w.error)
        return {"mode": "write", "run": f"{self.run:016x}", **self.counts(),
                "errors": dict(errors), "stopped": self.stopped, "died": self.died,
                "seconds": round(seconds, 3),
                "acked_per_second": round(len(acked) / seconds, 1),
                "acked_blocks_per_second": round(sum(w.count for w in acked) / seconds, 1),
                "journal": str(journal)}


# ---- journal --------------------------------------------------------------------------

def write_atomically(path: Path, data: bytes, durable: bool = True) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        if durable:
            file.flush()
            os.fsync(file.fileno())
    os.replace(temporary, path)


def save_journal(path: Path, workload: Workload, initial: bytes, summary: dict[str, Any]) -> None:
    document = {
        "format": JOURNAL_FORMAT, "run": f"{workload.run:016x}",
        "offset": workload.offset, "size": workload.blocks * BLOCK, "block_size": BLOCK,
        "initial": initial.hex(),
        "writes": [[w.seq, w.offset, w.count, w.outcome, w.error] for w in workload.writes],
        "summary": summary,
    }
    write_atomically(path, json.dumps(document, separators=(",", ":")).encode())


def load_journal(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    if document.get("format") != JOURNAL_FORMAT:
        raise OracleError(f"{path} is not an {JOURNAL_FORMAT} journal")
    return document


# ---- verify ---------------------------------------------------------------------------

@dataclass
class History:
    """What the journal says about the region: the writes to every block, in seq order."""

    run: int
    writes: dict[int, tuple[int, int]]  # seq -> (offset, count)
    versions: dict[int, list[int]]  # block offset -> seqs of the writes to it
    last_acked: dict[int, int]  # block offset -> seq of the last acknowledged write

    @classmethod
    def from_journal(cls, document: dict[str, Any]) -> History:
        history = cls(int(document["run"], 16), {}, {}, {})
        for seq, offset, count, outcome, _ in document["writes"]:
            history.writes[seq] = (offset, count)
            for at in range(offset, offset + count * BLOCK, BLOCK):
                history.versions.setdefault(at, []).append(seq)
                if outcome == "acked":
                    history.last_acked[at] = seq
        return history

    def identify(self, data: memoryview, offset: int, initial: bytes) -> int | str:
        """The version a block holds: a seq, 0 for its initial content, or a description
        of foreign content."""
        magic, where, seq, run, _, _ = HEADER.unpack_from(data)
        if magic == MAGIC and run == self.run and where == offset and self.wrote(seq, offset):
            start, count = self.writes[seq]
            expected = block_content(run, seq, offset, (offset - start) // BLOCK, count)
            if data == expected:
                return int(seq)
        if block_digest(data) == initial:
            return 0
        if magic != MAGIC:
            return "no header, not the initial content"
        if run != self.run:
            return f"a block of run {run:016x}"
        if where != offset:
            return f"seq {seq}'s block for offset {where}"
        if not self.wrote(seq, offset):
            return f"seq {seq}, which never wrote here"
        return f"seq {seq}'s header with a different body (torn or corrupt)"

    def wrote(self, seq: int, offset: int) -> bool:
        start, count = self.writes.get(seq, (0, 0))
        return start <= offset < start + count * BLOCK


def judge(history: History, data: memoryview, offset: int, initial: bytes) -> tuple[str, Any]:
    """("ok" | "lost" | "foreign", what was found) for one block."""
    found = history.identify(data, offset, initial)
    if isinstance(found, str):
        return "foreign", found
    acked = history.last_acked.get(offset)
    if acked is None or found >= acked:
        return "ok", found
    return "lost", found


def verify(conn: Connection, document: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    history = History.from_journal(document)
    initial = bytes.fromhex(document["initial"])
    verdicts: Counter[str] = Counter()
    states: Counter[str] = Counter()
    examples: dict[str, list[dict[str, Any]]] = {"lost": [], "foreign": []}
    newest = 0  # the highest seq any block holds
    for start, data in conn.read(document["offset"], document["size"]):
        view = memoryview(data)
        for at in range(0, len(data), BLOCK):
            offset = start + at
            index = (offset - document["offset"]) // BLOCK
            verdict, found = judge(history, view[at:at + BLOCK], offset,
                                   initial[index * 16:index * 16 + 16])
            verdicts[verdict] += 1
            if isinstance(found, int):
                newest = max(newest, found)
            states[state_of(history, offset, found, verdict)] += 1
            if verdict != "ok" and len(examples[verdict]) < EXAMPLES:
                examples[verdict].append({"offset": offset,
                                          "expected_seq": history.last_acked.get(offset),
                                          "found": "initial" if found == 0 else found})
    acked = sum(1 for w in document["writes"] if w[3] == "acked")
    return {"mode": "verify", "run": document["run"], "blocks": sum(verdicts.values()),
            "written_blocks": len(history.versions), "acked_writes": acked,
            "ok": verdicts["ok"], "lost": verdicts["lost"], "foreign": verdicts["foreign"],
            "states": dict(states), "newest_found": newest, "lost_examples": examples["lost"],
            "foreign_examples": examples["foreign"],
            "seconds": round(time.monotonic() - started, 3)}


def state_of(history: History, offset: int, found: Any, verdict: str) -> str:
    """What an "ok" block holds: its initial content, its last acknowledged write, or a
    later unacknowledged one (which did reach the disk)."""
    if verdict != "ok":
        return verdict
    if found == 0:
        return "initial"
    return "acked" if found == history.last_acked.get(offset) else "unacknowledged"


# ---- command line ---------------------------------------------------------------------

def size_argument(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    value = int(text[:-1] if scale > 1 else text)
    if value < 0 or value * scale % BLOCK:
        raise argparse.ArgumentTypeError(f"{text} is not a multiple of {BLOCK}")
    return value * scale


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="oracle.py", description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    write = modes.add_parser("write", help="run a journaled random-write workload")
    verify = modes.add_parser("verify", help="judge the region against a journal")
    for mode in (write, verify):
        mode.add_argument("--uri", required=True)
        mode.add_argument("--journal", required=True, type=Path)
        mode.add_argument("--io-timeout", type=float, default=30,
                          help="give up on a server silent this long (seconds)")
    write.add_argument("--offset", required=True, type=size_argument)
    write.add_argument("--size", required=True, type=size_argument)
    write.add_argument("--queue-depth", type=int, default=16)
    write.add_argument("--max-blocks", type=int, default=16)
    stop = write.add_mutually_exclusive_group(required=True)
    stop.add_argument("--seconds", type=float)
    stop.add_argument("--writes", type=int)
    write.add_argument("--seed", type=int)
    write.add_argument("--rate", type=float, help="writes per second (default: unlimited)")
    write.add_argument("--drain-seconds", type=float, default=10,
                       help="after SIGTERM/SIGINT, wait this long for in-flight writes")
    write.add_argument("--progress", type=Path,
                       help="keep a JSON file of the running counts up to date")
    arguments = parser.parse_args(argv)
    if arguments.mode == "write" and min(arguments.size, arguments.queue_depth,
                                         arguments.max_blocks, arguments.writes or 1) < 1:
        parser.error("--size, --queue-depth, --max-blocks and --writes must be positive")
    return arguments


def run_write(arguments: argparse.Namespace) -> int:
    conn = Connection(arguments.uri, arguments.io_timeout)
    if arguments.offset + arguments.size > conn.size:
        raise OracleError(f"region ends at {arguments.offset + arguments.size}, "
                          f"beyond the export ({conn.size} bytes)")
    limits = Limits(arguments.queue_depth, arguments.max_blocks, arguments.seconds,
                    arguments.writes, arguments.rate, arguments.io_timeout,
                    arguments.drain_seconds)
    workload = Workload(conn, arguments.offset, arguments.size, limits, arguments.seed,
                        arguments.progress)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, workload.on_signal)
    initial = initial_digests(conn, arguments.offset, arguments.size)
    workload.run_all()
    conn.close()
    summary = workload.summary(arguments.journal)
    save_journal(arguments.journal, workload, initial, summary)
    print(json.dumps(summary), flush=True)
    return 0


def run_verify(arguments: argparse.Namespace) -> int:
    document = load_journal(arguments.journal)
    conn = Connection(arguments.uri, arguments.io_timeout)
    report = verify(conn, document)
    conn.close()
    print(json.dumps(report), flush=True)
    return 1 if report["lost"] or report["foreign"] else 0


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        return run_write(arguments) if arguments.mode == "write" else run_verify(arguments)
    except OracleError as error:
        print(f"oracle.py: {error}", file=sys.stderr)
    except Exception:
        traceback.print_exc()
    return 3


if __name__ == "__main__":
    # The script's own directory (tests/) holds a package named nbd: keep it off the path.
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    sys.exit(main())
