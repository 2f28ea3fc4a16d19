"""Pagination of the lists.

Page numbers (`?page=`) give the contract's `{count, next, previous, results}`. Counting a
user's whole history on every page would cost a scan of it per request once it is large, so
`count` is exact up to CHAT_LIST_EXACT_COUNT_LIMIT items (a bounded count), and above that it
is an exact count cached for CHAT_LIST_COUNT_CACHE_SECONDS (so it may lag by that long).

Deep history is read with keyset pagination instead: `?cursor=` (empty for the first page)
answers `{next, previous, results}`, each page an index range whatever its depth (DRF's
CursorPagination).
"""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.core.cache import cache
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.utils.dateparse import parse_datetime
from django.utils.functional import cached_property
from rest_framework import pagination
from rest_framework.exceptions import NotFound
from rest_framework.request import Request

from chat.api.converters import parse_id
from chat.errors import InvalidRequest

CURSOR_PARAM = "cursor"
PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


def _invalid(param: str, text: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {text}", extra={"fields": {param: [text]}})


class _PageSize:
    """`?page_size=`: a positive integer (else 400); above MAX_PAGE_SIZE, MAX_PAGE_SIZE."""

    page_size: int | None = PAGE_SIZE
    page_size_query_param: str | None = "page_size"
    max_page_size: int | None = MAX_PAGE_SIZE

    def get_page_size(self, request: Request) -> int:
        param = self.page_size_query_param or "page_size"
        raw = request.query_params.get(param)
        if raw is None:
            return self.page_size or PAGE_SIZE
        size = parse_id(raw)
        if size is None:
            raise _invalid(param, "Must be a positive integer.")
        return min(size, self.max_page_size or MAX_PAGE_SIZE)


class BoundedCountPaginator(Paginator):
    @cached_property
    def count(self) -> int:
        queryset: QuerySet = self.object_list  # type: ignore[assignment]
        limit = settings.CHAT_LIST_EXACT_COUNT_LIMIT
        counted = queryset[: limit + 1].count()
        if counted <= limit:
            return counted
        query = str(queryset.query).encode()
        key = "chat:list-count:" + hashlib.sha256(query).hexdigest()
        total = cache.get(key)
        if total is None:
            total = queryset.count()
            cache.set(key, total, settings.CHAT_LIST_COUNT_CACHE_SECONDS)
        return total


class PageNumberPagination(_PageSize, pagination.PageNumberPagination):
    """The contract's `{count, next, previous, results}` pages."""

    django_paginator_class = BoundedCountPaginator

    def get_page_number(self, request: Request, paginator: Paginator) -> int:
        """`?page=`: a positive integer (else 400); past the last page, DRF's 404."""
        raw = request.query_params.get(self.page_query_param)
        if raw is None:
            return 1
        number = parse_id(raw)
        if number is None:
            raise _invalid(self.page_query_param, "Must be a positive integer.")
        return number


class CursorPagination(_PageSize, pagination.CursorPagination):
    """Keyset pages for deep history: `{next, previous, results}`."""

    cursor_query_param = CURSOR_PARAM

    def decode_cursor(self, request: Request) -> pagination.Cursor | None:
        """DRF's, and a position that does not fit the ordering's first field (a cursor made
        up by hand) is an invalid cursor too (404), not a database error."""
        cursor = super().decode_cursor(request)
        if cursor is not None and cursor.position is not None:
            if not self._valid_position(str(cursor.position)):
                raise NotFound(self.invalid_cursor_message)
        return cursor

    def _valid_position(self, position: str) -> bool:
        field = self.ordering[0].lstrip("-")
        if field == "id":
            return parse_id(position) is not None
        if field == "created_at":
            try:
                return parse_datetime(position) is not None
            except ValueError:
                return False
        return True

    def __init__(self, ordering: tuple[str, ...]) -> None:
        self.ordering = ordering
