"""chat.db's precompiled writes store exactly what the ORM would."""

from __future__ import annotations

import pytest
from django.db import DatabaseError
from django.utils import timezone

from chat import db
from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db(transaction=True)


def test_insert_and_update_round_trip_through_the_orm():
    conversation = db.insert(Conversation(title="Ünïcode ✓", temperature=0.5))
    assert conversation.pk is not None
    created = timezone.now()
    message = db.insert(
        Message(
            conversation=conversation,
            prompt_message="Привет!",
            created_at=created,
            model="gpt-4o",
            temperature=1.25,
            max_tokens=64,
            context_message_ids=[3, 1, 2],
            previous_replies=[{"response": "old", "completed_at": None}],
            idempotency_key="k-1",
        )
    )
    stored = Message.objects.get(pk=message.pk)
    assert stored.conversation_id == conversation.pk
    assert stored.prompt_message == "Привет!"
    assert stored.created_at == created
    assert stored.temperature == 1.25 and stored.max_tokens == 64
    assert stored.context_message_ids == [3, 1, 2]
    assert stored.previous_replies == [{"response": "old", "completed_at": None}]
    assert stored.status == "pending" and stored.response == ""
    assert stored.updated_at is not None  # auto_now applied on insert

    message.response = "Здравствуйте!"
    message.status = "completed"
    message.completed_at = timezone.now()
    before = stored.updated_at
    db.update(message, ["response", "status", "completed_at", "updated_at"])
    stored = Message.objects.get(pk=message.pk)
    assert stored.response == "Здравствуйте!" and stored.status == "completed"
    assert stored.completed_at == message.completed_at
    assert stored.updated_at > before
    assert stored.model == "gpt-4o"  # untouched columns stay


def test_updating_a_deleted_row_is_an_error_not_a_reinsert():
    message = db.insert(Message(conversation=db.insert(Conversation()), prompt_message="x"))
    Message.objects.filter(pk=message.pk).delete()
    message.response = "late"
    with pytest.raises(DatabaseError):
        db.update(message, ["response"])
    assert not Message.objects.filter(pk=message.pk).exists()
