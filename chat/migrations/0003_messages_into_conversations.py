"""Every message stored before conversations existed becomes a conversation of its own, titled
from its prompt: that is what the contract's single-prompt create does from now on too."""

from django.db import migrations

TITLE_LENGTH = 60


def _title(prompt: str) -> str:
    text = " ".join(prompt.split())
    if len(text) <= TITLE_LENGTH:
        return text
    cut = text[:TITLE_LENGTH].rsplit(" ", 1)[0] or text[:TITLE_LENGTH]
    return cut + "…"


def forwards(apps, schema_editor):
    Conversation = apps.get_model("chat", "Conversation")
    Message = apps.get_model("chat", "Message")
    orphans = Message.objects.filter(conversation__isnull=True).order_by("id")
    for message in orphans.iterator(chunk_size=1000):
        conversation = Conversation.objects.create(
            title=_title(message.prompt_message),
            model=message.model,
            created_at=message.created_at,
            updated_at=message.created_at,
        )
        Message.objects.filter(pk=message.pk).update(conversation=conversation)


def backwards(apps, schema_editor):
    pass  # the conversation column goes away with 0002's reversal


class Migration(migrations.Migration):
    dependencies = [("chat", "0002_conversations")]
    operations = [migrations.RunPython(forwards, backwards)]
