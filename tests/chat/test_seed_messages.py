"""`manage.py seed_messages`: the bulk data of the deep-history benchmark."""

from __future__ import annotations

from collections import Counter
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from chat.management.commands.seed_messages import ConversationPlan
from chat.models import Conversation, Message, MessageStatus


@pytest.mark.django_db
def test_seeds_completed_messages_in_order_and_in_conversations():
    out = StringIO()
    call_command("seed_messages", 345, conversations=20, batch=100, stdout=out)

    assert "created 345 messages in 18 conversations" in out.getvalue()
    assert Message.objects.count() == 345
    assert Conversation.objects.count() == 18
    rows = list(Message.objects.order_by("id").values_list("created_at", "conversation_id"))
    times = [created_at for created_at, _ in rows]
    assert times == sorted(times) and len(set(times)) == len(times)
    # The list order (created_at, id) is the insertion (id) order.
    listed = list(Message.objects.values_list("id", flat=True))
    assert listed == sorted(listed)
    sizes = Counter(conversation for _, conversation in rows)
    assert max(sizes.values()) <= 20 and sum(sizes.values()) == 345
    assert set(Message.objects.values_list("status", flat=True)) == {MessageStatus.COMPLETED}
    assert not Message.objects.filter(response="").exists()
    # Each conversation spans its own messages' times.
    for conversation in Conversation.objects.all():
        mine = Message.objects.filter(conversation=conversation)
        assert conversation.created_at == mine.earliest("created_at").created_at
        assert conversation.updated_at == mine.latest("created_at").created_at


@pytest.mark.django_db
def test_adds_to_what_is_there():
    call_command("seed_messages", 30, conversations=10, stdout=StringIO())
    call_command("seed_messages", 30, conversations=10, stdout=StringIO())
    assert Message.objects.count() == 60
    assert Conversation.objects.count() == 6


def test_plan_interleaves_conversations_and_spans_match():
    plan = ConversationPlan(messages=1234, size=7, active=10)
    owners = [plan.conversation_of(index) for index in range(plan.messages)]
    sizes = Counter(owners)
    assert set(sizes) == set(range(plan.conversations)) and max(sizes.values()) <= 7
    assert owners[:3] == [0, 1, 2]  # consecutive messages go to different conversations
    for conversation in range(plan.conversations):
        indexes = [i for i, owner in enumerate(owners) if owner == conversation]
        assert plan.message_span(conversation) == (indexes[0], indexes[-1])


@pytest.mark.django_db
def test_rejects_non_positive_counts():
    with pytest.raises(CommandError):
        call_command("seed_messages", 0, stdout=StringIO())
