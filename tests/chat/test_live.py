"""Following a generation of another process through Redis (chat.live)."""

from __future__ import annotations

import asyncio

import pytest
import redis

from chat import generations, live
from chat.generations import Finished, TextDelta
from chat.models import Message
from chat.redis_client import close_redis
from chat.services import messages
from tests.billing.conftest import REDIS_TEST_URL, redis_or_skip

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def with_redis(settings):
    redis_or_skip()
    settings.REDIS_URL = REDIS_TEST_URL
    keys: list[str] = []
    yield keys
    await close_redis()
    if keys:
        redis.Redis.from_url(REDIS_TEST_URL).delete(*keys)


async def _follow_as_another_process(message_id: int) -> tuple[str, list[float], Finished]:
    """What a follower in a process without the generation sees (the view fetched the message
    just before)."""
    state = await Message.objects.aget(pk=message_id)
    text, arrivals = "", []
    loop = asyncio.get_running_loop()
    async for event in messages._follow_live(state, None, {False: "", True: ""}):
        if isinstance(event, TextDelta):
            text += event.text
            arrivals.append(loop.time())
        elif isinstance(event, Finished):
            return text, arrivals, event
    raise AssertionError("no Finished")


async def test_a_follower_elsewhere_sees_the_regenerated_reply_live(
    anonymous, fake_openai, with_redis
):
    fake_openai.reply = "first answer"
    first = await messages.message_send(owner=anonymous, prompt="one")
    message = first.message
    with_redis.append(live.stream_key(message))
    fake_openai.reply = "the second and better answer"
    fake_openai.latency = 1.0
    fake_openai.stream_chunks = 6
    await messages.message_regenerate(owner=anonymous, message_id=message.pk, stream=True)
    regenerated = await Message.objects.aget(pk=message.pk)
    with_redis.append(live.stream_key(regenerated))
    assert live.stream_key(regenerated) != live.stream_key(message)

    text, arrivals, finished = await _follow_as_another_process(message.pk)

    # The new generation's text, not the first one's (whose stream has ended).
    assert text == "the second and better answer"
    assert finished.error is None and finished.message.status == "completed"
    assert len(arrivals) >= 3 and arrivals[-1] - arrivals[0] > 0.3  # live, not one burst
    # The generation publishes its end before it leaves the registry: it leaves soon after.
    for _ in range(100):
        if generations.get(message.pk) is None:
            break
        await asyncio.sleep(0.02)
    assert generations.get(message.pk) is None
