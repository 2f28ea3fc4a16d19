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
from django.utils.functional import cached_property
from rest_framework import pagination

CURSOR_PARAM = "cursor"


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


class PageNumberPagination(pagination.PageNumberPagination):
    """The contract's `{count, next, previous, results}` pages."""

    django_paginator_class = BoundedCountPaginator
    page_size = 20
    page_size_query_param = "page_size"
    max_page_size = 100


class CursorPagination(pagination.CursorPagination):
    """Keyset pages for deep history: `{next, previous, results}`."""

    cursor_query_param = CURSOR_PARAM
    page_size = 20
    page_size_query_param = "page_size"
    max_page_size = 100

    def __init__(self, ordering: tuple[str, ...]) -> None:
        self.ordering = ordering
