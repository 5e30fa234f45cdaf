"""Offline consistency check of a replica directory.

Reads everything and changes nothing. It keeps going past each problem so that one run
reports all of them: the metadata (structure and digest), the state record, every layer file
(presence and size), leftovers of interrupted operations, and the stored checksum of every
snapshot, recomputed from the data, naming the byte ranges that differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.chain import checksum as checksums
from appliance.chain import format as fmt
from appliance.chain.directory import open_directory, read_metadata
from appliance.chain.layerfile import LayerFile
from appliance.chain.state import read_state_file
from appliance.errors import Corruption


@dataclass
class CheckReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok, "problems": self.problems,
                "notes": self.notes, "verified_snapshots": self.verified}


def check(path: str | Path) -> CheckReport:
    """Check the replica at *path*. Raises only when *path* is not a replica at all or is
    in use; damage is reported in the returned :class:`CheckReport`."""
    path = Path(path)
    report = CheckReport(path)
    dir_fd = open_directory(path, exclusive=False)
    try:
        meta = _check_metadata(dir_fd, path, report)
        try:
            generation, revision = read_state_file(dir_fd)
            report.notes.append(f"generation {generation}, revision {revision}")
        except (Corruption, OSError) as exc:
            report.problems.append(f"state record: {exc}")
        if meta is not None:
            _check_layers(dir_fd, meta, report)
            _check_strays(dir_fd, meta, report)
    finally:
        os.close(dir_fd)
    return report


def _check_metadata(dir_fd: int, path: Path, report: CheckReport) -> fmt.Metadata | None:
    try:
        meta = read_metadata(dir_fd, path)
    except Corruption as exc:
        report.problems.append(f"metadata: {exc}")
        return None
    if meta.pending is not None:
        report.notes.append("a purge was interrupted; the next writable open completes it")
    return meta


def _check_layers(dir_fd: int, meta: fmt.Metadata, report: CheckReport) -> None:
    for layer in sorted(meta.layers.values(), key=lambda x: x.id):
        label = f"snapshot {layer.name!r}" if layer.name else "the head"
        name = fmt.layer_file_name(layer.id)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            report.problems.append(f"{label}: layer file {name} cannot be opened "
                                   f"({exc.strerror})")
            continue
        lf = LayerFile(layer.id, fd, layer.size)
        try:
            actual = os.fstat(fd).st_size
            if actual < layer.size:
                report.problems.append(f"{label}: layer file {name} is {actual} bytes, the "
                                       f"metadata says {layer.size}")
            elif layer.is_head and actual != layer.size:
                report.notes.append("an expand was interrupted; the next writable open "
                                    "completes it")
            elif not layer.is_head and not layer.removed:
                _check_checksum(dir_fd, layer, lf, label, report)
        finally:
            lf.close()


def _check_checksum(dir_fd: int, layer: fmt.Layer, lf: LayerFile, label: str,
                    report: CheckReport) -> None:
    if layer.checksum is None:
        report.notes.append(f"{label} has no checksum yet")
        return
    try:
        stored = checksums.load(dir_fd, layer.id)
        if stored.digest != layer.checksum:
            raise Corruption("its checksum file does not match the metadata")
        actual = checksums.compute(lf)
    except (Corruption, OSError) as exc:
        report.problems.append(f"{label}: {exc}")
        return
    bad = checksums.chunk_ranges(checksums.differing_chunks(stored, actual), layer.size)
    for offset, length in bad:
        report.problems.append(f"{label}: data differs from its checksum in bytes "
                               f"{offset}-{offset + length - 1}")
    if not bad:
        report.verified.append(layer.name or "")


def _check_strays(dir_fd: int, meta: fmt.Metadata, report: CheckReport) -> None:
    for entry in sorted(os.listdir(dir_fd)):
        match = fmt.LAYER_FILE.fullmatch(entry)
        if entry.endswith(fmt.TEMP_SUFFIX) or (match and int(match["id"]) not in meta.layers):
            report.notes.append(f"leftover file {entry} from an interrupted operation; the "
                                "next writable open removes it")
