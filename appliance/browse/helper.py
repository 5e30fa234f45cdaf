"""``python -m appliance.browse.helper SPEC``: the process behind one browse mount.

Started detached by the node daemon (so it outlives a restart of the daemon, like an
engine), it reads the spec (a JSON file the daemon wrote, mode 0600), opens the image,
serves it over FUSE at the spec's ``fuse`` directory, writes ``{"state": "ready"}`` (or
``failed`` with the error) to the spec's ``status`` file, keeps the image's statistics in
it every few seconds, and serves until SIGTERM (or the FUSE mount is taken away).

Spec: ``{"kind": "snapshot", "directory", "snapshot"}`` or ``{"kind": "backup", "backup",
"target": {the backup target as the store keeps it}, "secrets_dir", "cache_bytes"}``, and
``fuse``, ``status``.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from appliance.browse.fusefs import serve
from appliance.browse.images import BackupFile, Image, SnapshotFile
from appliance.errors import ApplianceError

log = logging.getLogger("appliance.browse")
STATISTICS_INTERVAL = 2.0


def open_image(spec: dict[str, Any]) -> tuple[Image, Any]:
    """The image of *spec*, and what to close with it."""
    if spec["kind"] == "snapshot":
        image = SnapshotFile(Path(spec["directory"]), spec["snapshot"])
        return image, None
    from appliance.backup.access import open_backup_store  # noqa: PLC0415 - backups only

    opened = open_backup_store(spec["target"], Path(spec["secrets_dir"]))
    store = opened.__enter__()
    try:
        manifest = store.find(spec["backup"])
        return BackupFile(store, manifest, int(spec.get("cache_bytes") or 256 << 20)), opened
    except BaseException:
        opened.__exit__(None, None, None)
        raise


def write_status(path: Path, value: dict[str, Any]) -> None:
    """Replace the status file (readers see the old one or the new one)."""
    staged = path.with_suffix(".tmp")
    staged.write_text(json.dumps(value, sort_keys=True))
    staged.replace(path)


async def run(spec: dict[str, Any]) -> int:
    status = Path(spec["status"])
    try:
        image, closer = await trio.to_thread.run_sync(open_image, spec)
    except ApplianceError as exc:
        write_status(status, {"state": "failed", "error": str(exc)})
        return 1
    try:
        async with trio.open_nursery() as nursery:
            def ready() -> None:
                write_status(status, {"state": "ready", "size": image.size,
                                      **image.statistics()})

            async def keep_statistics() -> None:
                while True:
                    await trio.sleep(STATISTICS_INTERVAL)
                    write_status(status, {"state": "ready", "size": image.size,
                                          **image.statistics()})

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(keep_statistics)

            async def fuse() -> None:
                try:
                    await serve(image, spec["fuse"], ready)
                except RuntimeError as exc:  # pyfuse3's mount failed
                    write_status(status, {"state": "failed", "error": str(exc)})
                nursery.cancel_scope.cancel()

            nursery.start_soon(fuse)
    finally:
        write_status(status, {"state": "stopped", "size": image.size, **image.statistics()})
        image.close()
        if closer is not None:
            closer.__exit__(None, None, None)
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(sys.argv[1]).read_text())
    return trio.run(run, spec)


if __name__ == "__main__":
    sys.exit(main())
