"""Data carried over by migrations, and the admin pages."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from tests.factories import make_message


@pytest.mark.django_db(transaction=True)
def test_messages_stored_before_conversations_each_get_their_own():
    executor = MigrationExecutor(connection)
    executor.migrate([("chat", "0001_initial")])
    old_apps = executor.loader.project_state([("chat", "0001_initial")]).apps
    OldMessage = old_apps.get_model("chat", "Message")
    first = OldMessage.objects.create(prompt_message="First old prompt", model="gpt-3.5-turbo")
    second = OldMessage.objects.create(
        prompt_message="A second, much longer old prompt " * 5, model="gpt-4o"
    )

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())

    from chat.models import Message

    migrated = {m.pk: m for m in Message.objects.select_related("conversation")}
    assert migrated[first.pk].conversation.title == "First old prompt"
    assert migrated[second.pk].conversation.title.endswith("…")
    assert migrated[second.pk].conversation.model == "gpt-4o"
    assert migrated[first.pk].conversation_id != migrated[second.pk].conversation_id


@pytest.mark.django_db(transaction=True)
def test_admin_lists_searches_and_filters_messages(admin_client):
    message = make_message(prompt_message="findable prompt", status="failed", error_code="x")
    assert admin_client.get("/admin/chat/message/").status_code == 200
    found = admin_client.get("/admin/chat/message/?q=findable&status__exact=failed")
    assert found.status_code == 200 and b"findable prompt" in found.content
    missing = admin_client.get("/admin/chat/message/?status__exact=completed")
    assert b"findable prompt" not in missing.content
    detail = admin_client.get(f"/admin/chat/message/{message.pk}/change/")
    assert detail.status_code == 200
    conversations = admin_client.get("/admin/chat/conversation/")
    assert conversations.status_code == 200
