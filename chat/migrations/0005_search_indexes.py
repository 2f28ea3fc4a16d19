"""Indexes for `GET /api/messages/?search=` on PostgreSQL (on SQLite the search is a scan).

The expressions are exactly those `chat.selectors.message_list` searches on, so the planner can
use them: a full-text index over prompt and reply, and trigram indexes for the substring match.
pg_trgm is a trusted extension (PostgreSQL 13+): the database owner can create it.
"""

from django.db import migrations

INDEXES = [
    (
        "message_search_fts",
        "USING gin (to_tsvector('simple'::regconfig, "
        "COALESCE(prompt_message, '') || ' ' || COALESCE(response, '')))",
    ),
    ("message_prompt_trgm", "USING gin (UPPER(prompt_message::text) gin_trgm_ops)"),
    ("message_response_trgm", "USING gin (UPPER(response::text) gin_trgm_ops)"),
]


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    for name, definition in INDEXES:
        schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {name} ON chat_message {definition}")


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name, _ in INDEXES:
        schema_editor.execute(f"DROP INDEX IF EXISTS {name}")


class Migration(migrations.Migration):
    dependencies = [("chat", "0004_conversation_required")]
    operations = [migrations.RunPython(create, drop)]
