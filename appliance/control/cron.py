"""Cron schedules of recurring jobs: checked once when a job is created, then asked for the
slots (the times a schedule names) around a moment. Times are seconds since the epoch;
schedules are read in UTC, so a node's time zone and daylight saving never move a slot.

The expressions are the five fields of crontab(5) (minute, hour, day of month, month, day
of week, with ``*``, ``,``, ``-``, ``/`` and names) or one of ``@hourly``, ``@daily``,
``@weekly``, ``@monthly``, ``@yearly``; the parser is croniter's. A sixth field (seconds)
is refused: a job runs at most once a minute.
"""

from __future__ import annotations

from datetime import UTC, datetime

from croniter import CroniterError, croniter

from appliance.errors import InvalidArgument

MAX_LENGTH = 200
MACROS = ("@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually", "@midnight")


def check(expression: str) -> str:
    """*expression*, stripped, if it is a schedule this product runs; else InvalidArgument
    naming what is wrong."""
    if not isinstance(expression, str):
        raise InvalidArgument("a cron schedule must be a string such as '0 * * * *'")
    text = " ".join(expression.split())
    example = "such as '*/15 * * * *' (every 15 minutes) or '0 3 * * *' (03:00 UTC daily)"
    if not text or len(text) > MAX_LENGTH:
        raise InvalidArgument(f"invalid cron schedule {expression!r}: give five fields "
                              f"(minute hour day-of-month month day-of-week), {example}")
    if text.startswith("@"):
        if text not in MACROS:
            raise InvalidArgument(f"invalid cron schedule {expression!r}: the @ forms are "
                                  f"{', '.join(MACROS)}")
        return text
    fields = text.split(" ")
    if len(fields) != 5:
        raise InvalidArgument(f"invalid cron schedule {expression!r}: {len(fields)} field(s); "
                              "give five (minute hour day-of-month month day-of-week), "
                              f"{example}")
    try:
        croniter(text, datetime.now(UTC)).get_next(float)
    except (CroniterError, ValueError, KeyError) as exc:
        raise InvalidArgument(f"invalid cron schedule {expression!r}: {exc}; {example}") \
            from None
    return text


def _at(moment: float) -> datetime:
    return datetime.fromtimestamp(moment, UTC)


def next_after(expression: str, moment: float) -> float:
    """The first slot strictly after *moment*."""
    return float(croniter(expression, _at(moment)).get_next(float))


def latest_at_or_before(expression: str, moment: float) -> float:
    """The last slot at or before *moment*."""
    previous = float(croniter(expression, _at(moment)).get_prev(float))
    following = next_after(expression, previous)
    return following if following <= moment else previous
