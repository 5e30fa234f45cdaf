"""Checking the warnings a test expects, instead of discarding them.

The suite fails a test that logs a warning nobody expected (``_no_unexpected_log_records``
in ``conftest.py``). A test that provokes warnings on purpose names them with
:func:`expect_log`: every warning logged so far must match one of the patterns, and every
pattern must have matched, before they are forgotten.
"""

from __future__ import annotations

import logging
import re

import pytest


def expect_log(caplog: pytest.LogCaptureFixture, *patterns: str,
               level: int = logging.WARNING) -> list[str]:
    """Check and forget the records at *level* or above logged so far by the test: each
    must match (``re.search`` on ``"LOGGER: MESSAGE"``) one of *patterns*, and each pattern
    must match at least one record. Returns the records' texts."""
    assert patterns, "name the warnings the test expects"
    compiled = [re.compile(p) for p in patterns]
    texts = [f"{r.name}: {r.getMessage()}" for r in caplog.get_records("call")
             if r.levelno >= level]
    unexpected = [t for t in texts if not any(p.search(t) for p in compiled)]
    missing = [p.pattern for p in compiled if not any(p.search(t) for t in texts)]
    assert not unexpected, f"unexpected log records: {unexpected}"
    assert not missing, f"expected log records not logged: {missing}; logged: {texts}"
    caplog.clear()
    return texts
