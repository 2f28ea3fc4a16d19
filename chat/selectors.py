"""Reads. Views and services get data through here, never by building querysets inline.

Every read of a user's data takes the user (`owner`): another user's id is simply not found.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import User
from django.db import DatabaseError, connection
from django.db.models import F, Func, Q, QuerySet, TextField

from chat.errors import DatabaseUnavailable, NotFound
from chat.models import Conversation, Message

# The order of a user's message list (oldest first, stable), served by message_owner_created_idx.
MESSAGE_ORDER = ("created_at", "id")
# Shortest term a PostgreSQL trigram index serves (migration 0005).
TRIGRAM_LENGTH = 3


class Casefold(Func):
    """Unicode-aware lower-casing on SQLite (its own LOWER/LIKE only fold ASCII), backed by a
    Python function registered on every SQLite connection (chat.apps)."""

    function = "CASEFOLD"
    output_field = TextField()


def _newest(queryset: QuerySet[Message], limit: int) -> QuerySet[Message]:
    """`queryset` cut to its `limit` newest messages (by id, which follows creation)."""
    if not limit:
        return queryset
    newest_ids = queryset.order_by("-id").values("id")[:limit]
    return queryset.filter(id__in=newest_ids)


def _text_search(queryset: QuerySet[Message], term: str) -> QuerySet[Message]:
    """Case-insensitive search over prompts and replies (Unicode-aware).

    Where an index serves the term (PostgreSQL: full-text, and trigram for 3+ characters) every
    message in scope is searched; elsewhere the search scans the CHAT_SEARCH_SCAN_LIMIT newest
    messages in scope, so its cost is bounded whatever the history's size.
    """
    limit = settings.CHAT_SEARCH_SCAN_LIMIT
    if connection.vendor == "postgresql":
        from django.contrib.postgres.search import SearchQuery, SearchVector

        if len(term) < TRIGRAM_LENGTH:
            queryset = _newest(queryset, limit)
        # The same expressions as the indexes of migration 0005, so the planner uses them.
        # `icontains` compiles to UPPER(column::text) LIKE UPPER(...), as the trigram indexes.
        vector = SearchVector("prompt_message", "response", config="simple")
        query = SearchQuery(term, search_type="websearch", config="simple")
        return queryset.annotate(search_document=vector).filter(
            Q(search_document=query)
            | Q(prompt_message__icontains=term)
            | Q(response__icontains=term)
        )
    queryset = _newest(queryset, limit)
    if connection.vendor == "sqlite":
        folded = term.casefold()
        return queryset.annotate(
            prompt_folded=Casefold(F("prompt_message")), response_folded=Casefold(F("response"))
        ).filter(Q(prompt_folded__contains=folded) | Q(response_folded__contains=folded))
    return queryset.filter(Q(prompt_message__icontains=term) | Q(response__icontains=term))


def message_list(
    *, owner: User, search: str | None = None, conversation_id: int | None = None
) -> QuerySet[Message]:
    """The owner's messages oldest first, in a stable order (served by
    `message_owner_created_idx`, or `message_conversation_idx` for one conversation)."""
    if conversation_id is not None:
        queryset = Message.objects.filter(owner=owner, conversation_id=conversation_id).order_by(
            "id"
        )
    else:
        queryset = Message.objects.filter(owner=owner).order_by(*MESSAGE_ORDER)
    if search:
        queryset = _text_search(queryset, search)
    return queryset


def message_get(*, owner: User, message_id: int, for_update: bool = False) -> Message:
    queryset = Message.objects.select_for_update() if for_update else Message.objects
    try:
        return queryset.get(pk=message_id, owner=owner)
    except Message.DoesNotExist:
        raise NotFound(f"Message {message_id} does not exist.") from None


def message_state(*, message_id: int) -> Message | None:
    """A message as stored now, whoever owns it (for following a generation already
    authorized by its owner's request), or None once it is gone."""
    return Message.objects.filter(pk=message_id).first()


def conversation_list(*, owner: User) -> QuerySet[Conversation]:
    """Newest activity first (served by `conversation_owner_idx`)."""
    return Conversation.objects.filter(owner=owner).order_by("-updated_at", "-id")


def conversation_get(
    *, owner: User, conversation_id: int, for_update: bool = False
) -> Conversation:
    queryset = Conversation.objects.select_for_update() if for_update else Conversation.objects
    try:
        return queryset.get(pk=conversation_id, owner=owner)
    except Conversation.DoesNotExist:
        raise NotFound(f"Conversation {conversation_id} does not exist.") from None


def conversation_messages(*, owner: User, conversation_id: int) -> list[Message]:
    return list(Message.objects.filter(owner=owner, conversation_id=conversation_id).order_by("id"))


def database_ping() -> None:
    """Raise DatabaseUnavailable unless the database answers a trivial query."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as exc:
        raise DatabaseUnavailable() from exc
