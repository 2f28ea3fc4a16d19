"""Exact money: every amount is an integer number of pico-dollars (1e-12 USD).

Integers are exact on every database (SQLite stores a DecimalField as a float) and in Python. A
price per million tokens with at most 6 decimals is a whole number of pico-dollars per token
(price * 10**6), so every cost is an exact integer too.
"""

from __future__ import annotations

import re
from decimal import ROUND_DOWN, ROUND_UP, Decimal

PICO_PER_USD = 10**12


def to_pico(usd: Decimal | int | str) -> int:
    """Pico-dollars in `usd`; ValueError if it is not a whole number of them (or not finite)."""
    value = Decimal(usd)
    if not value.is_finite():
        raise ValueError(f"not a finite amount: {usd!r}")
    pico = value.scaleb(12)
    if pico != pico.to_integral_value():
        raise ValueError(f"{usd} USD is not a whole number of pico-dollars")
    return int(pico)


def to_usd(pico: int) -> Decimal:
    """The exact amount in USD, normalized: 1_950_000 -> Decimal('0.00000195')."""
    if pico == 0:
        return Decimal(0)
    return Decimal(int(pico)).scaleb(-12).normalize()


def usd_str(pico: int) -> str:
    """A plain decimal string without exponent: "0.00000195", "5", "12.5", "-0.1"."""
    return format(to_usd(pico), "f")


def usd_display(pico: int, *, round_up: bool = False) -> str:
    """For messages to people: at most 4 decimals (rounded down, or up with `round_up`); an
    amount that would show as 0 is shown exactly instead."""
    exact = to_usd(pico)
    shown = exact.quantize(Decimal("0.0001"), rounding=ROUND_UP if round_up else ROUND_DOWN)
    if shown == 0 and pico != 0:
        return format(exact, "f")
    return format(shown.normalize(), "f") if shown != 0 else "0"


# At most this many decimals in a configured amount (a budget, a price per million tokens).
MAX_DECIMALS = 6
_PLAIN_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def parse_usd(text: str, *, variable: str) -> Decimal:
    """A non-negative plain decimal with at most MAX_DECIMALS decimals, for settings; raises
    ValueError with a message naming `variable`."""
    text = text.strip()
    if not _is_plain_decimal(text):
        raise ValueError(f"{variable}: {text!r} is not a plain non-negative decimal number")
    value = Decimal(text)
    if value != value.quantize(Decimal(1).scaleb(-MAX_DECIMALS), rounding=ROUND_DOWN):
        raise ValueError(f"{variable}: {text!r} has more than {MAX_DECIMALS} decimals")
    return value


def _is_plain_decimal(text: str) -> bool:
    return _PLAIN_DECIMAL.fullmatch(text) is not None
