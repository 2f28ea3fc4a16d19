"""Ids in URLs and query strings: positive integers that fit the database's 64-bit keys.

An id out of range is answered like any other id that names nothing (404 in a path, 400 in a
query string), instead of overflowing the database driver.
"""

from __future__ import annotations

MAX_ID = 2**63 - 1


class IdConverter:
    regex = "[0-9]{1,19}"

    def to_python(self, value: str) -> int:
        number = int(value)
        if not 1 <= number <= MAX_ID:
            raise ValueError(value)  # no match: 404
        return number

    def to_url(self, value: int) -> str:
        return str(value)


def parse_id(raw: str) -> int | None:
    """An id from a query string, or None if it is not one."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        return None
    number = int(raw)
    return number if 1 <= number <= MAX_ID else None
