"""The fault rows run with every replica behind its server and with the local fast path,
each on an idle machine and under CPU load. The default suite runs one diagonal of that
square: every replica behind its server under CPU load, and the local fast path on an idle
machine (each code path once, the server path under the harsher timing). The other corners
(idle with servers, loaded with the fast path) run with the slow tests (``-m slow``), to
keep the suite in its budget; run them before calling a change to the data path done."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(item, "callspec", None)
        if params is None or "volumes" not in params.params:
            continue
        load, volumes = params.params.get("load"), params.params["volumes"]
        if (load == "idle") == (volumes == "server"):
            item.add_marker(pytest.mark.slow)
