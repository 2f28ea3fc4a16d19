"""Reads. Views and services get data through here, never by building querysets inline."""

from __future__ import annotations

from django.db import DatabaseError, connection
from django.db.models import F, Func, Q, QuerySet, TextField

from chat.errors import DatabaseUnavailable, NotFound
from chat.models import Conversation, Message


class Casefold(Func):
    """Unicode-aware lower-casing on SQLite (its own LOWER/LIKE only fold ASCII), backed by a
    Python function registered on every SQLite connection (chat.apps)."""

    function = "CASEFOLD"
    output_field = TextField()


def _text_search(queryset: QuerySet[Message], term: str) -> QuerySet[Message]:
    if connection.vendor == "postgresql":
        from django.contrib.postgres.search import SearchQuery, SearchVector

        vector = SearchVector("prompt_message", "response", config="simple")
        query = SearchQuery(term, search_type="websearch", config="simple")
        return queryset.annotate(search_document=vector).filter(
            Q(search_document=query)
            | Q(prompt_message__icontains=term)
            | Q(response__icontains=term)
        )
    if connection.vendor == "sqlite":
        folded = term.casefold()
        return queryset.annotate(
            prompt_folded=Casefold(F("prompt_message")), response_folded=Casefold(F("response"))
        ).filter(Q(prompt_folded__contains=folded) | Q(response_folded__contains=folded))
    return queryset.filter(Q(prompt_message__icontains=term) | Q(response__icontains=term))


def message_list(
    *, search: str | None = None, conversation_id: int | None = None
) -> QuerySet[Message]:
    """Messages oldest first, in a stable order (served by `message_created_idx`, or
    `message_conversation_idx` for one conversation)."""
    if conversation_id is not None:
        queryset = Message.objects.filter(conversation_id=conversation_id).order_by("id")
    else:
        queryset = Message.objects.order_by("created_at", "id")
    if search:
        queryset = _text_search(queryset, search)
    return queryset


def message_get(*, message_id: int, for_update: bool = False) -> Message:
    queryset = Message.objects.select_for_update() if for_update else Message.objects
    try:
        return queryset.get(pk=message_id)
    except Message.DoesNotExist:
        raise NotFound(f"Message {message_id} does not exist.") from None


def conversation_list() -> QuerySet[Conversation]:
    """Newest activity first (served by `conversation_activity_idx`)."""
    return Conversation.objects.order_by("-updated_at", "-id")


def conversation_get(*, conversation_id: int) -> Conversation:
    try:
        return Conversation.objects.get(pk=conversation_id)
    except Conversation.DoesNotExist:
        raise NotFound(f"Conversation {conversation_id} does not exist.") from None


def conversation_messages(*, conversation_id: int) -> list[Message]:
    return list(Message.objects.filter(conversation_id=conversation_id).order_by("id"))


def database_ping() -> None:
    """Raise DatabaseUnavailable unless the database answers a trivial query."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as exc:
        raise DatabaseUnavailable() from exc
