"""A separate process for tests/billing/test_limits.py: after "go" on stdin, N concurrent
`hit()`s of one key, the results printed as JSON. Backend and database come from the
environment (REDIS_URL, DATABASE_URL), as for a server process.

    python -m tests.billing.hit_worker KEY LIMIT WINDOW_SECONDS COUNT
"""

from __future__ import annotations

import asyncio
import json
import os
import sys


def main() -> None:
    key, limit, window, count = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from billing.limits import Rate, hit
    from chat import db
    from chat.redis_client import close_redis

    rate = Rate(limit, window)

    async def burst() -> list[float | None]:
        try:
            return await asyncio.gather(*(hit(key=key, rate=rate) for _ in range(count)))
        finally:
            await close_redis()

    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit("no go")
    results = asyncio.run(burst())
    db.close_connections()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
