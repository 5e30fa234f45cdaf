"""The fault rows run with every replica behind its server and with the local fast path,
each on an idle machine and under CPU load. The default suite runs one corner of that
square per test, alternating in the order the tests are defined: the first with every
replica behind its server under CPU load, the next with the local fast path on an idle
machine, and so on (each code path on half the rows, the server path under the harsher
timing); a test of one path runs under load. The other corners run with the slow tests
(``-m slow``), to keep the suite in its budget; run them before calling a change to the
data path done."""

from __future__ import annotations

import pytest

CORNERS = (("loaded", "server"), ("idle", "local"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    order: dict[str, int] = {}
    for item in items:
        params = getattr(item, "callspec", None)
        if params is None:
            continue
        if "volumes" not in params.params:  # one path only: under load by default
            if params.params.get("load") == "idle":
                item.add_marker(pytest.mark.slow)
            continue
        name = getattr(item, "originalname", item.name)
        index = order.setdefault(name, len(order))
        corner = (params.params.get("load"), params.params["volumes"])
        if corner != CORNERS[index % 2]:
            item.add_marker(pytest.mark.slow)
