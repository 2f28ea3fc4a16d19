"""Budget periods: calendar days, weeks (from Monday) and months, in UTC. Pure, importable
from the settings module."""

from __future__ import annotations

import datetime as dt

PERIODS = ("day", "week", "month")
ADJECTIVES = {"day": "daily", "week": "weekly", "month": "monthly"}


def period_bounds(period: str, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """(start, end) of the period containing `now`: aware UTC datetimes, end exclusive."""
    if now.tzinfo is None:
        raise ValueError("period_bounds needs an aware datetime")
    day = now.astimezone(dt.UTC).date()
    if period == "day":
        start, end = day, day + dt.timedelta(days=1)
    elif period == "week":
        start = day - dt.timedelta(days=day.weekday())
        end = start + dt.timedelta(days=7)
    elif period == "month":
        start = day.replace(day=1)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown budget period {period!r}; expected one of {', '.join(PERIODS)}")
    return _midnight(start), _midnight(end)


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
