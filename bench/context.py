"""How the cost of building a conversation's context grows with the conversation's length.

Creates conversations of 10, 1,000 and 10,000 completed turns in a throwaway SQLite database
(or DATABASE_URL if set), then times `chat.context.build_context` for a new prompt in each:
median and p95 wall time over many runs, the SQL queries per build, and the turns kept. The
cost should stay flat: history is read newest first and reading stops when the budget is spent.

    make bench-context                 # or: .venv/bin/python -m bench context --runs 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench context", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes", default="10,1000,10000", help="turns per conversation")
    parser.add_argument("--runs", type=int, default=100, help="timed builds per conversation")
    parser.add_argument("--budget", type=int, default=4000, help="context budget in tokens")
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="context-bench-")
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{tmp}/bench.sqlite3")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["CHAT_CONTEXT_TOKEN_BUDGET"] = str(args.budget)

    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from chat.context import build_context
    from chat.models import Conversation, Message

    call_command("migrate", verbosity=0)
    owner, _ = get_user_model().objects.get_or_create(username="context-bench")
    print(f"database: {connection.vendor}, budget: {args.budget} tokens, runs: {args.runs}")
    print(f"{'turns':>8} {'median ms':>10} {'p95 ms':>8} {'queries':>8} {'turns kept':>11}")
    for size in [int(s) for s in args.sizes.split(",")]:
        conversation = Conversation.objects.create(
            owner=owner, title=f"{size} turns", system_prompt="Be brief."
        )
        Message.objects.bulk_create(
            (
                Message(
                    owner=owner,
                    conversation=conversation,
                    prompt_message=f"Question {i}: what do you think about topic number {i}?",
                    response=f"Answer {i}: topic {i} is interesting for several reasons.",
                    status="completed",
                    model="gpt-3.5-turbo",
                )
                for i in range(size)
            ),
            batch_size=2000,
        )
        # The first build counts and caches the token counts of the turns it reads.
        build_context(
            conversation_id=conversation.pk,
            prompt="warm up",
            model="gpt-3.5-turbo",
            system_prompt="Be brief.",
        )
        timings = []
        for _ in range(args.runs):
            started = time.perf_counter()
            context = build_context(
                conversation_id=conversation.pk,
                prompt="And what about the next topic?",
                model="gpt-3.5-turbo",
                system_prompt="Be brief.",
            )
            timings.append((time.perf_counter() - started) * 1000)
        with CaptureQueriesContext(connection) as queries:
            build_context(
                conversation_id=conversation.pk,
                prompt="count queries",
                model="gpt-3.5-turbo",
                system_prompt="Be brief.",
            )
        timings.sort()
        p95 = timings[int(len(timings) * 0.95) - 1]
        print(
            f"{size:>8} {statistics.median(timings):>10.2f} {p95:>8.2f} "
            f"{len(queries):>8} {len(context.message_ids):>11}"
        )
    return 0
