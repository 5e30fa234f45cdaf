"""run_job: a blocking job in a worker thread that a trio cancellation reaches."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from appliance.errors import Cancelled
from appliance.node.work import run_job


def count_until_cancelled(limit: int, stopped: list[int], *, cancel: threading.Event) -> int:
    """A job of *limit* steps that checks its token between steps."""
    for step in range(limit):
        if cancel.is_set():
            stopped.append(step)
            raise Cancelled("cancelled")
        time.sleep(0.01)
    return limit


async def test_a_job_returns_its_result_and_raises_its_errors() -> None:
    assert await run_job(count_until_cancelled, 3, []) == 3

    def fail(*, cancel: threading.Event) -> None:
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        await run_job(fail)


async def test_a_cancellation_stops_the_thread_before_it_returns() -> None:
    stopped: list[int] = []
    with trio.move_on_after(0.2) as scope:
        await run_job(count_until_cancelled, 100_000, stopped)
    assert scope.cancelled_caught
    assert len(stopped) == 1 and stopped[0] > 0  # the job saw its token, and has ended


async def test_the_caller_token_cancels_the_job_alone() -> None:
    token = threading.Event()
    stopped: list[int] = []

    async def cancel_soon() -> None:
        await trio.sleep(0.1)
        token.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_soon)
        with pytest.raises(Cancelled):
            await run_job(count_until_cancelled, 100_000, stopped, cancel=token)
    assert len(stopped) == 1


async def test_a_job_that_finishes_despite_the_cancellation_returns_its_result() -> None:
    entered = threading.Event()
    release = threading.Event()

    def past_its_last_check(*, cancel: threading.Event) -> str:
        entered.set()
        release.wait(10)
        return "done"

    results: list[str] = []

    async def run() -> None:
        results.append(await run_job(past_its_last_check))

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.to_thread.run_sync(entered.wait)
            scope.cancel()
            release.set()
    assert results == ["done"]
