"""Users own conversations and messages; refusals and stop requests are stored.

Conversations and messages stored before users existed go to the shared anonymous user
(CHAT_ANONYMOUS_USERNAME), which is what requests without credentials act as.
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def give_existing_rows_to_the_anonymous_user(apps, schema_editor):
    Conversation = apps.get_model("chat", "Conversation")
    Message = apps.get_model("chat", "Message")
    if not Conversation.objects.exists():
        return
    User = apps.get_model(*settings.AUTH_USER_MODEL.split("."))
    anonymous, _ = User.objects.get_or_create(
        username=settings.CHAT_ANONYMOUS_USERNAME, defaults={"password": "!"}
    )
    Conversation.objects.update(owner=anonymous)
    Message.objects.update(owner=anonymous)


class Migration(migrations.Migration):

    dependencies = [
        ('chat', '0006_message_conversation_fk_unindexed'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name='message',
            name='message_unique_idempotency_key',
        ),
        migrations.RemoveIndex(
            model_name='conversation',
            name='conversation_activity_idx',
        ),
        migrations.AddField(
            model_name='conversation',
            name='owner',
            field=models.ForeignKey(db_index=False, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='chat_conversations', to=settings.AUTH_USER_MODEL),
        ),
        migrations.AddField(
            model_name='message',
            name='cancel_requested',
            field=models.BooleanField(default=False),
        ),
        migrations.AddField(
            model_name='message',
            name='cost',
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='message',
            name='owner',
            field=models.ForeignKey(db_index=False, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='chat_messages', to=settings.AUTH_USER_MODEL),
        ),
        migrations.AddField(
            model_name='message',
            name='refusal',
            field=models.TextField(blank=True, default=''),
        ),
        migrations.RunPython(give_existing_rows_to_the_anonymous_user, migrations.RunPython.noop),
        migrations.AlterField(
            model_name='conversation',
            name='owner',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='chat_conversations', to=settings.AUTH_USER_MODEL),
        ),
        migrations.AlterField(
            model_name='message',
            name='owner',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='chat_messages', to=settings.AUTH_USER_MODEL),
        ),
        migrations.AlterField(
            model_name='message',
            name='status',
            field=models.CharField(choices=[('pending', 'Pending'), ('streaming', 'Streaming'), ('completed', 'Completed'), ('refused', 'Refused'), ('failed', 'Failed'), ('truncated', 'Truncated'), ('interrupted', 'Interrupted'), ('cancelled', 'Cancelled')], default='pending', max_length=16),
        ),
        migrations.AddIndex(
            model_name='conversation',
            index=models.Index(fields=['owner', '-updated_at', '-id'], name='conversation_owner_idx'),
        ),
        migrations.AddIndex(
            model_name='message',
            index=models.Index(fields=['owner', 'created_at', 'id'], name='message_owner_created_idx'),
        ),
        migrations.AddConstraint(
            model_name='message',
            constraint=models.UniqueConstraint(condition=models.Q(('idempotency_key__isnull', False)), fields=('owner', 'idempotency_key'), name='message_unique_owner_idempotency_key'),
        ),
    ]
