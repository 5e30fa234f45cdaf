"""How an engine that refused to start tells the process that launched it why: its error's
code and message in a small JSON file beside the control socket (the launcher raises the
same error, so a refusal reads as one clear message, not an engine log)."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.errors import ApplianceError, error_class


def report_start_failure(path: Path, exc: ApplianceError) -> None:
    """Leave *exc* (code and message) at *path* for the process that launched the engine."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps({"code": exc.code, "message": exc.message}) + "\n")
    temp.replace(path)


def read_start_failure(path: Path) -> ApplianceError | None:
    """The error an engine that refused to start left at *path*, if any."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    return error_class(str(document.get("code")))(str(document.get("message")))
