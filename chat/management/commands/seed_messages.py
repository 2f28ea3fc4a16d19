"""`python manage.py seed_messages N`: bulk-create N completed messages, for benchmarks.

The messages are spread over conversations of `--conversations` messages each; conversations
are interleaved the way concurrent users' chats are (`ACTIVE_CONVERSATIONS` at a time, each
message going to the next of them in turn). `created_at` increases with every message (one every
`SECONDS_BETWEEN_MESSAGES`, the last a moment ago), so the id order and the list order agree.
Prompts and replies are slices of a fixed text, of varied realistic lengths; the same N gives
the same rows. Rows are added to what the database already holds (`manage.py flush` empties
it first).

Each batch of `--batch` messages is one `bulk_create` in one transaction: a million rows take
a few minutes on SQLite, longer on PostgreSQL (mostly its search indexes' upkeep). On
PostgreSQL the tables are analysed at the end, as autovacuum would do soon after such a load:
without statistics the planner sorts the whole table for a deep page.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, transaction
from django.utils import timezone

from chat.models import Conversation, Message, MessageStatus
from chat.services import users

ACTIVE_CONVERSATIONS = 100
SECONDS_BETWEEN_MESSAGES = 10
MODEL = "gpt-3.5-turbo"
PROMPT_CHARS = (20, 400)
RESPONSE_CHARS = (40, 1600)
RANDOM_SEED = 20230609

_WORDS = (
    "the model answers every question about travel food music history science code weather "
    "books films cities rivers mountains languages gardens recipes trains budgets schedules "
    "a short list of ideas with reasons and examples for each one and a closing summary "
    "please explain why how when where which could would should compare contrast describe"
).split()


@dataclass(frozen=True)
class ConversationPlan:
    """Which conversation each message belongs to: blocks of `active` conversations, each block
    taking `active * size` consecutive messages in turn."""

    messages: int
    size: int
    active: int = ACTIVE_CONVERSATIONS

    @property
    def conversations(self) -> int:
        return math.ceil(self.messages / self.size)

    def _block(self, index: int) -> tuple[int, int, int]:
        """(first conversation, conversations in the block, messages in the block) of the block
        that message or conversation `index // (active * size)` falls in."""
        block = index // (self.active * self.size)
        first = block * self.active
        first_message = first * self.size
        return (
            first,
            min(self.active, self.conversations - first),
            min(self.active * self.size, self.messages - first_message),
        )

    def conversation_of(self, message: int) -> int:
        first, width, _ = self._block(message)
        return first + (message - first * self.size) % width

    def message_span(self, conversation: int) -> tuple[int, int]:
        """Indexes of a conversation's first and last messages."""
        first, width, count = self._block(conversation * self.size)
        offset = conversation - first
        last = offset + width * ((count - 1 - offset) // width)
        return first * self.size + offset, first * self.size + last


class TextSource:
    """Deterministic text of varied lengths, cut from one long string (no per-row generation)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.text = " ".join(rng.choice(_WORDS) for _ in range(60_000))

    def take(self, bounds: tuple[int, int]) -> str:
        length = self.rng.randint(*bounds)
        start = self.rng.randrange(len(self.text) - length)
        return self.text[start : start + length].strip().capitalize() + "."


class Command(BaseCommand):
    help = "Bulk-create N completed messages in conversations (for benchmarks)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("count", type=int, help="messages to create")
        parser.add_argument(
            "--conversations",
            type=int,
            default=50,
            metavar="C",
            help="messages per conversation (default 50)",
        )
        parser.add_argument(
            "--batch", type=int, default=5000, help="messages per transaction (default 5000)"
        )
        parser.add_argument(
            "--owner",
            metavar="USERNAME",
            help="the user who owns them (created if needed; default: the anonymous user)",
        )

    def handle(
        self,
        *args: object,
        count: int,
        conversations: int,
        batch: int,
        owner: str | None,
        verbosity: int,
        **_: object,
    ) -> None:
        if count < 1 or conversations < 1 or batch < 1:
            raise CommandError("count, --conversations and --batch must be positive")
        if owner:
            owner_id = get_user_model().objects.get_or_create(username=owner)[0].pk
        else:
            owner_id = users.anonymous_user().pk
        plan = ConversationPlan(messages=count, size=conversations)
        started = time.monotonic()
        first_at = timezone.now() - timedelta(seconds=SECONDS_BETWEEN_MESSAGES * count)
        conversation_ids = self._create_conversations(plan, first_at, batch, owner_id)
        text = TextSource(random.Random(RANDOM_SEED))  # noqa: S311 (test data, reproducible)
        for offset in range(0, count, batch):
            indexes = range(offset, min(offset + batch, count))
            with transaction.atomic():
                Message.objects.bulk_create(
                    self._messages(indexes, plan, conversation_ids, first_at, text, owner_id)
                )
            if verbosity >= 2:
                self.stdout.write(f"{indexes.stop} / {count}")
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                for model in (Conversation, Message):
                    cursor.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")
        elapsed = time.monotonic() - started
        self.stdout.write(
            f"created {count} messages in {plan.conversations} conversations in {elapsed:.1f} s "
            f"({count / elapsed:.0f} messages/s)"
        )

    @staticmethod
    def _create_conversations(
        plan: ConversationPlan, first_at: datetime, batch: int, owner_id: int
    ) -> list[int]:
        step = timedelta(seconds=SECONDS_BETWEEN_MESSAGES)
        ids: list[int] = []
        for offset in range(0, plan.conversations, batch):
            rows = []
            for index in range(offset, min(offset + batch, plan.conversations)):
                first, last = plan.message_span(index)
                rows.append(
                    Conversation(
                        owner_id=owner_id,
                        title=f"Seeded conversation {index + 1}",
                        model=MODEL,
                        created_at=first_at + first * step,
                        updated_at=first_at + last * step,
                    )
                )
            with transaction.atomic():
                ids.extend(c.pk for c in Conversation.objects.bulk_create(rows))
        return ids

    @staticmethod
    def _messages(
        indexes: range,
        plan: ConversationPlan,
        conversation_ids: list[int],
        first_at: datetime,
        text: TextSource,
        owner_id: int,
    ) -> Iterator[Message]:
        step = timedelta(seconds=SECONDS_BETWEEN_MESSAGES)
        rng = text.rng
        for index in indexes:
            created_at = first_at + index * step
            prompt = text.take(PROMPT_CHARS)
            response = text.take(RESPONSE_CHARS)
            latency_ms = rng.randint(300, 4000)
            yield Message(
                owner_id=owner_id,
                conversation_id=conversation_ids[plan.conversation_of(index)],
                prompt_message=prompt,
                response=response,
                created_at=created_at,
                completed_at=created_at + timedelta(milliseconds=latency_ms),
                status=MessageStatus.COMPLETED,
                model=MODEL,
                finish_reason="stop",
                prompt_tokens=len(prompt) // 4 + 8,
                completion_tokens=len(response) // 4 + 1,
                latency_ms=latency_ms,
            )
