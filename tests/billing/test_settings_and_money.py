"""Settings parsing (and startup errors, through `manage.py check`), money, periods."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from billing.money import parse_usd, to_pico, to_usd, usd_display, usd_str
from billing.periods import period_bounds
from billing.prices import DEFAULT_PRICES, ModelPrice, parse_model_prices, parse_price_entries
from billing.rates import Rate, parse_rate

ROOT = Path(__file__).resolve().parents[2]
UTC = dt.UTC


# --- prices ---------------------------------------------------------------------------------


def test_default_prices_are_openai_list_prices():
    prices = parse_model_prices("", allowed_models=["gpt-3.5-turbo", "gpt-4o-mini", "gpt-4o"])
    assert prices["gpt-3.5-turbo"] == ModelPrice("gpt-3.5-turbo", Decimal("0.5"), Decimal("1.5"))
    assert prices["gpt-4o-mini"] == ModelPrice("gpt-4o-mini", Decimal("0.15"), Decimal("0.6"))
    assert prices["gpt-4o"] == ModelPrice("gpt-4o", Decimal("2.5"), Decimal("10"))
    assert set(parse_price_entries(DEFAULT_PRICES)) == set(prices)


def test_env_prices_merge_over_the_defaults():
    prices = parse_model_prices(
        " gpt-4o = 5:15 , llama3:8b=0:0,, tiny=0.000001:0.123456",
        allowed_models=["gpt-4o", "llama3:8b", "gpt-4o-mini"],
    )
    assert prices["gpt-4o"].input == Decimal(5) and prices["gpt-4o"].output == Decimal(15)
    assert prices["gpt-4o-mini"].input == Decimal("0.15")  # default kept
    assert prices["llama3:8b"].cost(prompt_tokens=10**6, completion_tokens=10**6) == 0
    assert prices["tiny"].input_pico_per_token == 1
    assert prices["tiny"].output_pico_per_token == 123456


def test_the_settings_hold_parsed_prices(settings):
    assert isinstance(settings.CHAT_MODEL_PRICES["gpt-4o"], ModelPrice)
    for model in settings.OPENAI_ALLOWED_MODELS:
        assert model in settings.CHAT_MODEL_PRICES


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("gpt-4o=2.5", "malformed entry 'gpt-4o=2.5'"),
        ("gpt-4o=:1", "not a plain non-negative decimal"),
        ("gpt-4o=", "malformed"),
        ("=1:2", "malformed"),
        ("gpt-4o", "malformed"),
        ("gpt-4o=1:2:3", "malformed"),
        ("gpt-4o=-1:2", "not a plain non-negative decimal"),
        ("gpt-4o=1e3:2", "not a plain non-negative decimal"),
        ("gpt-4o=abc:2", "not a plain non-negative decimal"),
        ("gpt-4o=0.0000001:2", "more than 6 decimals"),
        ("gpt-4o=1:2,gpt-4o=1:2", "priced twice"),
    ],
)
def test_malformed_prices_are_refused(text, fragment):
    with pytest.raises(ImproperlyConfigured) as error:
        parse_model_prices(text, allowed_models=["gpt-4o"])
    assert fragment in str(error.value)
    assert "CHAT_MODEL_PRICES" in str(error.value)


def test_six_decimals_with_trailing_zeros_are_fine():
    prices = parse_model_prices("x=0.1234560000:1.", allowed_models=["x"])
    assert prices["x"].input_pico_per_token == 123456
    assert prices["x"].output_pico_per_token == 10**6


def test_an_allowed_model_without_a_price_is_refused():
    with pytest.raises(ImproperlyConfigured) as error:
        parse_model_prices("", allowed_models=["gpt-4o", "llama3"])
    assert "llama3" in str(error.value) and "CHAT_MODEL_PRICES" in str(error.value)


# --- startup errors, as the service would meet them -------------------------------------------


def _check(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "OPENAI_"))}
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "config.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"OPENAI_ALLOWED_MODELS": "gpt-4o,llama3"}, ["llama3", "CHAT_MODEL_PRICES"]),
        ({"OPENAI_MODEL": "mistral"}, ["mistral", "CHAT_MODEL_PRICES"]),
        ({"CHAT_MODEL_PRICES": "gpt-4o=2.50"}, ["CHAT_MODEL_PRICES", "malformed"]),
        ({"CHAT_MODEL_PRICES": "gpt-4o=2.5000001:10"}, ["CHAT_MODEL_PRICES", "6 decimals"]),
        ({"CHAT_USER_BUDGET_PERIOD": "year"}, ["CHAT_USER_BUDGET_PERIOD", "year"]),
        ({"CHAT_USER_BUDGET_USD": "-5"}, ["CHAT_USER_BUDGET_USD"]),
        ({"CHAT_THROTTLE_USER": "5/fortnight"}, ["CHAT_THROTTLE_USER", "5/fortnight"]),
        ({"CHAT_THROTTLE_ANON": "lots"}, ["CHAT_THROTTLE_ANON"]),
        ({"CHAT_MAX_CONCURRENT_PER_USER": "-1"}, ["CHAT_MAX_CONCURRENT_PER_USER"]),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_bad_billing_settings_stop_the_service_at_startup(env, fragments):
    result = _check(**env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_good_billing_settings_start():
    result = _check(
        OPENAI_ALLOWED_MODELS="gpt-4o,llama3:8b",
        CHAT_MODEL_PRICES="llama3:8b=0:0,gpt-4o=2.5:10",
        CHAT_USER_BUDGET_USD="12.5",
        CHAT_USER_BUDGET_PERIOD="week",
        CHAT_THROTTLE_USER="100/hour",
        CHAT_THROTTLE_ANON="",
        CHAT_MAX_CONCURRENT_PER_USER="0",
    )
    assert result.returncode == 0, result.stderr


def test_billing_defaults():
    # The test run sets none of these: the defaults apply (read from the settings module, as
    # the test fixtures switch the limits off).
    from config import settings

    assert settings.CHAT_USER_BUDGET_USD is None
    assert settings.CHAT_USER_BUDGET_PERIOD == "month"
    assert settings.CHAT_THROTTLE_USER == ""
    assert settings.CHAT_THROTTLE_ANON == "30/min"
    assert settings.CHAT_MAX_CONCURRENT_PER_USER == 4
    assert settings.CHAT_RESERVATION_TTL_SECONDS == settings.OPENAI_TIMEOUT + 30


# --- rates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("30/min", Rate(30, 60)),
        ("5/m", Rate(5, 60)),
        ("100/hour", Rate(100, 3600)),
        ("1000/day", Rate(1000, 86400)),
        ("2/s", Rate(2, 1)),
        (" 7/Second ", Rate(7, 1)),
        ("0/min", Rate(0, 60)),
        ("", None),
        ("  ", None),
        (None, None),
    ],
)
def test_rates_parse_like_drf(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["5", "/min", "5/", "x/min", "-1/min", "5/week", "1.5/s"])
def test_malformed_rates_are_refused(text):
    with pytest.raises(ValueError):
        parse_rate(text)


# --- money ------------------------------------------------------------------------------------


def test_money_helpers_are_exact():
    assert to_pico(Decimal("0.00000195")) == 1_950_000
    assert to_pico(Decimal("5")) == 5 * 10**12
    assert to_pico("12.5") == 12_500_000_000_000
    assert to_usd(1_950_000) == Decimal("0.00000195")
    assert to_usd(0) == 0
    assert usd_str(1_950_000) == "0.00000195"
    assert usd_str(5 * 10**12) == "5"
    assert usd_str(12_500_000_000_000) == "12.5"
    assert usd_str(500 * 10**12) == "500"
    assert usd_str(1) == "0.000000000001"
    assert usd_str(0) == "0"
    with pytest.raises(ValueError):
        to_pico(Decimal("1e-13"))
    with pytest.raises(ValueError):
        to_pico(Decimal("NaN"))


def test_money_for_people():
    assert usd_display(12_345_678_900) == "0.0123"
    assert usd_display(12_345_678_900, round_up=True) == "0.0124"
    assert usd_display(5 * 10**12) == "5"
    assert usd_display(1_950_000) == "0.00000195"  # not "0"
    assert usd_display(0) == "0"


def test_costs_are_exact_integers():
    prices = parse_model_prices("", allowed_models=[])
    # gpt-4o: 1234 * $2.50/M + 567 * $10/M = $0.003085 + $0.00567
    assert prices["gpt-4o"].cost(prompt_tokens=1234, completion_tokens=567) == to_pico(
        Decimal("0.008755")
    )
    # gpt-4o-mini: 13 * $0.15/M + 1 * $0.60/M
    assert usd_str(prices["gpt-4o-mini"].cost(prompt_tokens=13, completion_tokens=1)) == (
        "0.00000255"
    )
    # A sum of many tiny costs has no rounding error (floats would: 0.1 + 0.2 != 0.3).
    one = prices["gpt-3.5-turbo"].cost(prompt_tokens=1, completion_tokens=0)
    assert sum([one] * 3_000_000) == to_pico(Decimal("1.5"))


def test_parse_usd():
    assert parse_usd("0.5", variable="X") == Decimal("0.5")
    for bad in ("", "-1", "1e2", "1,5", "0.1234567", "inf"):
        with pytest.raises(ValueError):
            parse_usd(bad, variable="X")


# --- periods ---------------------------------------------------------------------------------


def _utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("day", _utc(2026, 3, 5, 13, 30), _utc(2026, 3, 5), _utc(2026, 3, 6)),
        ("day", _utc(2026, 12, 31, 23, 59, 59), _utc(2026, 12, 31), _utc(2027, 1, 1)),
        ("day", _utc(2026, 3, 5), _utc(2026, 3, 5), _utc(2026, 3, 6)),
        # 2026-12-31 is a Thursday: its week runs Monday 28 to Monday 4 January.
        ("week", _utc(2026, 12, 31, 12), _utc(2026, 12, 28), _utc(2027, 1, 4)),
        ("week", _utc(2026, 3, 2), _utc(2026, 3, 2), _utc(2026, 3, 9)),  # a Monday
        ("week", _utc(2026, 3, 8, 23, 59), _utc(2026, 3, 2), _utc(2026, 3, 9)),  # a Sunday
        ("month", _utc(2026, 12, 31, 23, 59, 59), _utc(2026, 12, 1), _utc(2027, 1, 1)),
        ("month", _utc(2026, 1, 31, 12), _utc(2026, 1, 1), _utc(2026, 2, 1)),
        ("month", _utc(2028, 2, 29, 12), _utc(2028, 2, 1), _utc(2028, 3, 1)),
        ("month", _utc(2026, 2, 1), _utc(2026, 2, 1), _utc(2026, 3, 1)),
    ],
)
def test_calendar_periods_in_utc(period, now, start, end):
    assert period_bounds(period, now) == (start, end)


def test_periods_are_utc_whatever_the_zone_of_now():
    # 01:00 on 1 January in Moscow (UTC+3) is still 31 December in UTC.
    moscow = dt.timezone(dt.timedelta(hours=3))
    now = dt.datetime(2027, 1, 1, 1, 0, tzinfo=moscow)
    assert period_bounds("month", now) == (_utc(2026, 12, 1), _utc(2027, 1, 1))
    assert period_bounds("day", now)[0].tzinfo == UTC
    with pytest.raises(ValueError):
        period_bounds("year", now)
    with pytest.raises(ValueError):
        period_bounds("day", dt.datetime(2026, 1, 1))  # naive
