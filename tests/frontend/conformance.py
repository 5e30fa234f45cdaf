"""libiscsi's SCSI conformance suite (``iscsi-test-cu``, Debian's libiscsi-bin) against a
LUN: every suite run on its own (with a timeout: one that hangs fails alone), each test's
outcome parsed from the verbose output.

    python -m tests.frontend.conformance iscsi://HOST:PORT/IQN/1 [--user U --secret-file F]

prints one line per test (``SUITE.TEST passed|FAILED|timeout``) and a summary."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

SUITE_TIMEOUT = 180.0
_TEST = re.compile(r"^\s*Test: (?P<name>\S+) \.\.\.", re.M)
_FAILED = re.compile(r"(^|\s)FAILED\s*$", re.M)


def suites() -> list[str]:
    listed = subprocess.run(["iscsi-test-cu", "-l"], capture_output=True, text=True,
                            check=True, timeout=60).stdout
    return [line.strip() for line in listed.splitlines()
            if re.fullmatch(r"ALL\.[A-Za-z0-9]+", line.strip())]


def run_suite(url: str, suite: str, user: str | None, secret: str | None,
              timeout: float = SUITE_TIMEOUT) -> dict[str, str]:
    """The outcome of each test of *suite*: ``passed``, ``skipped`` (passed without
    testing: the target lacks what it tests), ``FAILED``; ``timeout`` for the suite."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LIBISCSI_")}
    if user is not None and secret is not None:
        environment.update(LIBISCSI_CHAP_USERNAME=user, LIBISCSI_CHAP_PASSWORD=secret)
    try:
        result = subprocess.run(["iscsi-test-cu", "-d", "-v", "-t", suite, url],
                                capture_output=True, text=True, timeout=timeout,
                                env=environment, check=False)
    except subprocess.TimeoutExpired:
        return {suite: "timeout"}
    output = result.stdout + result.stderr
    end = output.find("Run Summary:")
    output = output[:end] if end >= 0 else output
    outcomes: dict[str, str] = {}
    matches = list(_TEST.finditer(output))
    for index, match in enumerate(matches):
        # a test's messages run from its "Test:" line to the next one; CUnit ends them
        # with "passed" or a line "FAILED"
        body = output[match.end():matches[index + 1].start() if index + 1 < len(matches)
                      else None]
        if _FAILED.search(body):
            outcome = "FAILED"
        elif "[SKIPPED]" in body:
            outcome = "skipped"
        else:
            outcome = "passed"
        outcomes[f"{suite.removeprefix('ALL.')}.{match['name']}"] = outcome
    return outcomes or {suite: "no tests ran"}


def run_all(url: str, user: str | None = None, secret: str | None = None,
            only: list[str] | None = None) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for suite in only or suites():
        outcomes.update(run_suite(url, suite, user, secret))
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--user")
    parser.add_argument("--secret-file", type=Path)
    options = parser.parse_args()
    secret = options.secret_file.read_text().strip() if options.secret_file else None
    outcomes = run_all(options.url, options.user, secret)
    for name, outcome in outcomes.items():
        print(f"{name} {outcome}")
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    print("summary:", ", ".join(f"{n} {o}" for o, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
