"""Rate strings in Django REST framework's format (`30/min`, `5/m`, `100/hour`, `1000/day`,
`2/s`: the unit's first letter counts). Pure parsing, importable from the settings module;
`billing.limits` applies them."""

from __future__ import annotations

from dataclasses import dataclass

UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Rate:
    """At most `limit` requests in any window of `window` seconds."""

    limit: int
    window: float

    def __post_init__(self) -> None:
        if self.limit < 0 or not self.window > 0:
            raise ValueError(f"invalid rate: {self.limit} per {self.window} s")

    def __str__(self) -> str:
        return f"{self.limit}/{self.window:g}s"


def parse_rate(text: str | None) -> Rate | None:
    """`"30/min"` -> Rate(30, 60); None for an empty value (no limit). ValueError when
    malformed (DRF would fail on the first request instead)."""
    if text is None or not text.strip():
        return None
    count, slash, unit = text.strip().partition("/")
    count, unit = count.strip(), unit.strip().lower()
    if not slash or not count.isascii() or not count.isdigit() or unit[:1] not in UNIT_SECONDS:
        raise ValueError(
            f"{text!r} is not a rate like 30/min, 5/m, 100/hour, 1000/day or 2/s "
            "(requests / s, m, h or d)"
        )
    return Rate(limit=int(count), window=UNIT_SECONDS[unit[0]])
