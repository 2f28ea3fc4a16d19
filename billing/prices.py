"""Model prices: what a model call costs, in USD per million tokens.

`CHAT_MODEL_PRICES` (settings) holds a `dict[str, ModelPrice]` parsed at startup by
`parse_model_prices`. This module imports nothing from Django's app registry, so the settings
module can use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from billing.money import parse_usd

VARIABLE = "CHAT_MODEL_PRICES"

# OpenAI's list prices (USD per million input:output tokens) for the default allowed models.
DEFAULT_PRICES = "gpt-3.5-turbo=0.50:1.50,gpt-4o-mini=0.15:0.60,gpt-4o=2.50:10.00"


@dataclass(frozen=True)
class ModelPrice:
    """Unit prices of one model. `input`/`output` are USD per million tokens (at most 6
    decimals), so a token costs a whole number of pico-dollars: `*_pico_per_token`."""

    model: str
    input: Decimal
    output: Decimal

    @property
    def input_pico_per_token(self) -> int:
        return int(self.input.scaleb(6))

    @property
    def output_pico_per_token(self) -> int:
        return int(self.output.scaleb(6))

    def cost(self, *, prompt_tokens: int, completion_tokens: int) -> int:
        """Exact cost in pico-dollars."""
        return (
            prompt_tokens * self.input_pico_per_token
            + completion_tokens * self.output_pico_per_token
        )


def parse_price_entries(text: str, *, variable: str = VARIABLE) -> dict[str, ModelPrice]:
    """`model=input:output,...` -> prices. The model name is everything before the last `=`
    (so `llama3:8b=0:0` works); both prices must be written (0 too); empty entries are skipped.
    Raises ImproperlyConfigured naming `variable` and the entry."""
    prices: dict[str, ModelPrice] = {}
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        model, eq, pair = entry.rpartition("=")
        model = model.strip()
        parts = pair.split(":")
        if not eq or not model or len(parts) != 2:
            raise ImproperlyConfigured(
                f"{variable}: malformed entry {entry!r}; expected model=input:output in USD "
                "per million tokens, e.g. gpt-4o=2.50:10.00 (write 0:0 for a free model)."
            )
        try:
            input_price, output_price = (parse_usd(p, variable=variable) for p in parts)
        except ValueError as exc:
            raise ImproperlyConfigured(
                f"{exc} (entry {entry!r}; prices are USD per million tokens with at most 6 "
                "decimals)."
            ) from None
        if model in prices:
            raise ImproperlyConfigured(f"{variable}: model {model!r} is priced twice.")
        prices[model] = ModelPrice(model=model, input=input_price, output=output_price)
    return prices


def parse_model_prices(
    text: str, *, allowed_models: Iterable[str], variable: str = VARIABLE
) -> dict[str, ModelPrice]:
    """The default prices with `text`'s entries merged over them; every allowed model must
    have a price."""
    prices = parse_price_entries(DEFAULT_PRICES, variable="DEFAULT_PRICES")
    prices.update(parse_price_entries(text, variable=variable))
    missing = sorted(set(allowed_models) - set(prices))
    if missing:
        names = ", ".join(missing)
        raise ImproperlyConfigured(
            f"{variable} has no price for the allowed model(s) {names} (OPENAI_ALLOWED_MODELS / "
            f"OPENAI_MODEL). Add e.g. {variable}={missing[0]}=INPUT:OUTPUT in USD per million "
            "tokens (0:0 for a free model)."
        )
    return prices


def price_for(model: str) -> ModelPrice:
    """The configured price of `model`; ImproperlyConfigured when it has none."""
    try:
        return settings.CHAT_MODEL_PRICES[model]
    except KeyError:
        raise ImproperlyConfigured(
            f"Model {model!r} has no price in {VARIABLE}; it cannot be billed."
        ) from None
