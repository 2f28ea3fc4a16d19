"""List latency over a deep history: ``GET /api/messages/`` when the table holds `rows` messages.

The database is seeded with ``manage.py seed_messages`` (completed messages in conversations,
bulk-created), unless it already holds exactly `rows` messages (``--keep-db`` or
``--database-url`` keep a seeded database across runs; ``--reseed`` seeds anyway). Then, on a
warmed service, each query is timed `requests` times in a row on one keep-alive connection:

* first page: ``/api/messages/``;
* deep page: ``?page=`` the page before the last;
* deep cursor: the same depth through keyset pagination (``?cursor=``), if the service offers
  it. The cursor is the one the deep page's response names (``next_cursor``, or ``cursor=`` in
  its ``next`` link); else the keyset position of the deep page's last row (its
  ``created_at``, the list's order), as DRF's CursorPagination encodes a position; else it is
  reached by following cursors from the first keyset page (100 rows a step, for at most
  ``CURSOR_WALK_SECONDS``). Without cursors the row is skipped;
* conversation: ``?conversation=ID``, a conversation of the deep page.
"""

from __future__ import annotations

import base64
import math
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from bench import BenchError, report
from bench.config import RunConfig
from bench.http_client import Endpoint, HttpConnection, Response
from bench.servers import Stack

LIST_PATH = "/api/messages/"
PAGE_SIZE = 20  # the service's default page size
WARMUP_REQUESTS = 5
CURSOR_WALK_PAGE_SIZE = 100
CURSOR_WALK_SECONDS = 120.0
COUNT_SCRIPT = "from chat.models import Message; print(Message.objects.count())"


class Client:
    """Sequential GETs on one keep-alive connection (re-opened if the server closes it)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.connection: HttpConnection | None = None

    async def get(self, path: str) -> tuple[float, Response]:
        """The response and how long it took (seconds, connecting excluded)."""
        if self.connection is None or self.connection.closed:
            self.connection = await self.endpoint.connect()
        request = self.endpoint.request("GET", path)
        started = time.perf_counter()
        response = await self.connection.request(request)
        elapsed = time.perf_counter() - started
        if not response.keep_alive:
            self.connection.close()
        return elapsed, response

    async def get_json(self, path: str) -> dict[str, Any]:
        _, response = await self.get(path)
        if response.status != 200:
            raise BenchError(f"GET {path} -> HTTP {response.status}: {response.body[:300]!r}")
        page: dict[str, Any] = response.json()
        return page

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


def next_cursor(page: dict[str, Any]) -> str | None:
    """The cursor of the page after this one, if the response names one."""
    cursor = page.get("next_cursor")
    if isinstance(cursor, str):
        return cursor
    link = page.get("next")
    if isinstance(link, str):
        return dict(parse_qsl(urlsplit(link).query)).get("cursor")
    return None


def cursor_path(cursor: str, page_size: int = PAGE_SIZE) -> str:
    return f"{LIST_PATH}?{urlencode({'cursor': cursor, 'page_size': page_size})}"


def keyset_cursor(position: str) -> str:
    """The cursor of the page after the row at `position`, in DRF CursorPagination's encoding."""
    return base64.b64encode(urlencode({"p": position}).encode("ascii")).decode("ascii")


async def find_deep_cursor(
    client: Client, first_page: dict[str, Any], deep_page: dict[str, Any], depth: int
) -> tuple[str | None, str]:
    """A cursor about `depth` rows into the list, and how it was found (or why there is none)."""
    cursor = next_cursor(deep_page)
    if cursor is not None:
        return cursor, "from the deep page's response"
    rows = deep_page.get("results") or []
    position = rows[-1].get("created_at") if rows else None
    if isinstance(position, str):
        return keyset_cursor(position), "the deep page's last row, as a keyset position"
    cursor = next_cursor(first_page)
    if cursor is None:
        return None, "the service names no cursor (no next_cursor, no cursor= in next)"
    position = len(first_page.get("results", []))
    deadline = time.monotonic() + CURSOR_WALK_SECONDS
    while position + CURSOR_WALK_PAGE_SIZE <= depth and time.monotonic() < deadline:
        _, response = await client.get(cursor_path(cursor, CURSOR_WALK_PAGE_SIZE))
        if response.status != 200:
            return None, f"?cursor= answered HTTP {response.status}"
        page = response.json()
        following = next_cursor(page)
        if following is None:
            break
        cursor, position = following, position + len(page.get("results", []))
    return cursor, f"followed from the first page, {position} rows in"


async def time_query(client: Client, name: str, path: str, requests: int) -> dict[str, Any]:
    for _ in range(WARMUP_REQUESTS):
        await client.get(path)
    durations: list[float] = []
    errors: Counter[str] = Counter()
    size = 0
    for _ in range(requests):
        elapsed, response = await client.get(path)
        durations.append(elapsed)
        size = len(response.body)
        if response.status != 200:
            errors[f"http_{response.status}"] += 1
    return {
        "name": name,
        "path": path,
        "latency_ms": report.distribution_ms(durations),
        "bytes": size,
        "errors": dict(errors),
    }


def seed(config: RunConfig, stack: Stack) -> dict[str, Any]:
    """Seed the database unless it holds exactly the rows asked for already."""
    plan = config.deep_history
    stack.prepare_database(flush=False)
    present = int(stack.manage(["shell", "--no-imports", "-c", COUNT_SCRIPT]))
    if present == plan.rows and not plan.reseed:
        return {"seeded": False, "reason": f"the database already holds {present} messages"}
    if present:
        stack.manage(["flush", "--noinput"])
    started = time.monotonic()
    output = stack.manage(
        ["seed_messages", str(plan.rows), "--conversations", str(plan.conversation_size)]
    )
    seconds = time.monotonic() - started
    return {
        "seeded": True,
        "rows": plan.rows,
        "output": output.strip(),  # the command's own timing
        "seconds_with_startup": seconds,
    }


async def run(config: RunConfig, stack: Stack) -> dict[str, Any]:
    if config.deployment.external:
        seeding: dict[str, Any] = {"seeded": False, "reason": "--url: the service's own data"}
    else:
        seeding = seed(config, stack)
        await stack.start_service()
    result = stack.describe()
    result["seeding"] = seeding
    client = Client(stack.endpoints[0])
    try:
        first_page = await client.get_json(LIST_PATH)
        count = int(first_page["count"])
        deep_number = max(1, math.ceil(count / PAGE_SIZE) - 1)
        deep_path = f"{LIST_PATH}?page={deep_number}"
        deep_page = await client.get_json(deep_path)
        if not deep_page["results"]:
            raise BenchError("the database holds no messages")
        requests = config.deep_history.requests
        queries = [
            await time_query(client, "first page", LIST_PATH, requests),
            await time_query(client, "deep page", deep_path, requests),
        ]
        cursor, found = await find_deep_cursor(
            client, first_page, deep_page, deep_number * PAGE_SIZE
        )
        if cursor is None:
            queries.append({"name": "deep cursor", "skipped": found})
        else:
            query = await time_query(client, "deep cursor", cursor_path(cursor), requests)
            query["cursor_found"] = found
            queries.append(query)
        conversation = deep_page["results"][0]["conversation"]
        queries.append(
            await time_query(
                client, "conversation", f"{LIST_PATH}?conversation={conversation}", requests
            )
        )
    finally:
        client.close()
    result.update(
        database=stack.database.vendor if stack.database else "the running service's",
        messages=count,
        requests=requests,
        warmup_requests=WARMUP_REQUESTS,
        queries=queries,
        ok=not any(query.get("errors") for query in queries),
    )
    return result
