"""Request body parsers."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import parsers
from rest_framework.exceptions import ParseError
from rest_framework.utils import json


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, reading the body in one piece: DRF's decodes it through a codecs
    stream reader, which costs more than parsing a chat request's JSON. Same strictness (no
    NaN/Infinity), same errors (400 "JSON parse error - ...")."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = (stream.read() if stream is not None else b"").decode(encoding)
            parse_constant = json.strict_constant if self.strict else None
            return json.loads(text, parse_constant=parse_constant)
        except ValueError as exc:  # UnicodeDecodeError included
            raise ParseError(f"JSON parse error - {exc}") from exc
