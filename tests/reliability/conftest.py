"""The fault rows run with every replica behind its server and with the local fast path,
each on an idle machine and under CPU load. The default suite leaves out one corner, idle
with every replica behind its server (the loaded run meets the same code under harsher
timing); it runs with the slow tests (``-m slow``), to keep the suite in its budget."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("load") == "idle" and \
                params.params.get("volumes", "server") == "server" and \
                "volumes" in params.params:
            item.add_marker(pytest.mark.slow)
