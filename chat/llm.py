"""The gateway to the model API: the only module that touches the `openai` SDK.

The client is built from settings at call time (never at import) and cached per event loop,
because an `AsyncOpenAI` client's connection pool is bound to the loop that first used it.
SDK exceptions are translated here into the `chat.errors` family, so nothing above this module
knows the SDK exists.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import re
import time
import typing
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx2
import openai
from django.conf import settings

from chat import errors
from chat.http_transport import HTTPTransport, LeanAsyncClient

logger = logging.getLogger(__name__)

ChatTurn = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: int


@dataclass(frozen=True)
class Delta:
    """A piece of a streamed reply."""

    text: str


@dataclass(frozen=True)
class GenerationOptions:
    model: str
    temperature: float | None = None
    max_tokens: int | None = None

    def as_request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.model}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        return kwargs


@dataclass(frozen=True)
class _Upstream:
    config: tuple
    client: openai.AsyncOpenAI
    # The endpoint as an absolute URL: the SDK then parses it once per call instead of three
    # times to join it to the base URL.
    completions_url: str
    # The client's own settings, given per call: the SDK's request options would otherwise
    # deep-copy a default object for each one on every call.
    request_options: dict[str, Any]

    def call_options(self) -> dict[str, Any]:
        """Options for one model call, its retries included. The SDK makes a UUID per call as
        the call's idempotency key (which it sends only to APIs that take one); a process
        prefix and a counter give the same uniqueness for less."""
        key = f"chat-{_CALL_KEY_PREFIX}-{next(_call_numbers)}"
        return {**self.request_options, "headers": {}, "idempotency_key": key}


_CALL_KEY_PREFIX = uuid.uuid4().hex
_call_numbers = itertools.count(1)


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Upstream] = (
    weakref.WeakKeyDictionary()
)


def is_configured() -> bool:
    return bool(settings.OPENAI_API_KEY)


def _client_config() -> tuple:
    return (
        settings.OPENAI_API_KEY,
        settings.OPENAI_BASE_URL,
        settings.OPENAI_TIMEOUT,
        settings.OPENAI_MAX_RETRIES,
        settings.OPENAI_MAX_CONNECTIONS,
        settings.OPENAI_HTTP_BACKEND,
    )


def _upstream() -> _Upstream:
    """The client for the running event loop, rebuilt if the settings changed."""
    if not is_configured():
        raise errors.ServiceNotConfigured()
    loop = asyncio.get_running_loop()
    config = _client_config()
    cached = _clients.get(loop)
    if cached is not None:
        if cached.config == config:
            return cached
        # The settings changed: let the old client finish its requests, then close.
        _retire(cached.client)
    timeout = httpx2.Timeout(settings.OPENAI_TIMEOUT, connect=min(5.0, settings.OPENAI_TIMEOUT))
    limits = httpx2.Limits(
        max_connections=settings.OPENAI_MAX_CONNECTIONS,
        max_keepalive_connections=settings.OPENAI_MAX_CONNECTIONS,
    )
    if settings.OPENAI_HTTP_BACKEND == "httptools":
        http_client = LeanAsyncClient(
            timeout=timeout,
            transport=HTTPTransport(max_connections=settings.OPENAI_MAX_CONNECTIONS),
        )
    elif settings.OPENAI_HTTP_BACKEND == "aiohttp":
        http_client = openai.DefaultAioHttpClient(timeout=timeout, limits=limits)
    else:
        http_client = openai.DefaultAsyncHttpxClient(timeout=timeout, limits=limits)
    client = openai.AsyncOpenAI(
        api_key=settings.OPENAI_API_KEY,
        base_url=settings.OPENAI_BASE_URL,
        timeout=timeout,
        max_retries=0,  # retried by _with_retries, within our deadline
        http_client=http_client,
    )
    upstream = _Upstream(
        config,
        client,
        str(client.base_url).rstrip("/") + CHAT_COMPLETIONS_PATH,
        {"timeout": timeout, "max_retries": 0},
    )
    _clients[loop] = upstream
    return upstream


_retiring: set[asyncio.Task] = set()


def _retire(client: openai.AsyncOpenAI) -> None:
    async def close_later() -> None:
        await asyncio.sleep(settings.OPENAI_TIMEOUT + 5)
        await client.close()

    task = asyncio.get_running_loop().create_task(close_later())
    _retiring.add(task)
    task.add_done_callback(_retiring.discard)


async def close_client() -> None:
    """Close the running loop's client (at server shutdown)."""
    cached = _clients.pop(asyncio.get_running_loop(), None)
    if cached is not None:
        await cached.client.close()


_RETRYABLE = (errors.UpstreamUnavailable, errors.UpstreamRateLimited)


def _retry_delay(error: errors.UpstreamError, attempt: int) -> float:
    retry_after = error.extra.get("retry_after")
    if isinstance(retry_after, int):
        return float(retry_after)
    return min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)  # noqa: S311


async def _with_retries(call, deadline: float):
    """Run `call()` until it succeeds, retrying transient upstream failures.

    The SDK's own retries are off: it would sleep for a long Retry-After past our deadline and
    turn a clear "rate limited, retry in N s" (503) into a timeout (504). Here a retry happens
    only if its wait fits before the deadline; otherwise the error is raised at once.
    """
    attempt = 0
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                return await call()
        except BaseException as exc:
            error = _translate(exc)
            if not isinstance(error, _RETRYABLE) or attempt >= settings.OPENAI_MAX_RETRIES:
                _reraise(exc, error)
            attempt += 1
            delay = _retry_delay(error, attempt)
            if asyncio.get_running_loop().time() + delay >= deadline:
                _reraise(exc, error)
            logger.info("upstream %s, retry %d in %.1fs", error.code, attempt, delay)
            await asyncio.sleep(delay)


# The Chat Completions endpoint is called through the SDK client's generic `post()` (the SDK's
# documented way to make any request), with plain JSON in and out. The typed
# `client.chat.completions.create()` walks every request through TypedDict transforms and builds
# a model object for every response and stream chunk: 2.3 ms of CPU per call against 0.9 ms
# here (BENCHMARKS.md). Requests, auth, timeouts and status-code exceptions are the SDK's either
# way; the response fields used are read and checked below.
CHAT_COMPLETIONS_PATH = "/chat/completions"


def _request_body(
    messages: Sequence[ChatTurn], options: GenerationOptions, *, stream: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": list(messages), **options.as_request_kwargs()}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _usage_counts(usage: Any) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
    )


async def complete(*, messages: Sequence[ChatTurn], options: GenerationOptions) -> Completion:
    """One non-streaming chat completion; OPENAI_TIMEOUT bounds it, retries included."""
    upstream = _upstream()
    started = time.monotonic()
    deadline = asyncio.get_running_loop().time() + settings.OPENAI_TIMEOUT
    body = _request_body(messages, options, stream=False)
    call_options = upstream.call_options()
    result = await _with_retries(
        lambda: upstream.client.post(
            upstream.completions_url,
            body=body,
            cast_to=object,
            options=call_options,
        ),
        deadline,
    )
    latency_ms = int((time.monotonic() - started) * 1000)
    try:
        choice = result["choices"][0]
        text = choice["message"].get("content") or ""
        if not isinstance(text, str):
            raise TypeError("content is not a string")
        prompt_tokens, completion_tokens = _usage_counts(result.get("usage"))
        return Completion(
            text=text,
            model=result.get("model") or options.model,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_ms=latency_ms,
        )
    except (AttributeError, IndexError, KeyError, TypeError) as exc:
        raise errors.UpstreamBadResponse() from exc


async def stream(
    *, messages: Sequence[ChatTurn], options: GenerationOptions
) -> AsyncIterator[Delta | Completion]:
    """Yield the reply as `Delta`s, then one `Completion` with the whole text and the usage.

    OPENAI_TIMEOUT bounds the wait for the stream to start (retries included) and every gap
    between chunks, not the whole generation. A stream that ends without a finish_reason raises
    `UpstreamTruncated`.
    """
    upstream = _upstream()
    started = time.monotonic()
    parts: list[str] = []
    finish_reason: str | None = None
    model = options.model
    usage: Any = None
    deadline = asyncio.get_running_loop().time() + settings.OPENAI_TIMEOUT
    body = _request_body(messages, options, stream=True)
    call_options = upstream.call_options()
    response = await _with_retries(
        lambda: upstream.client.post(
            upstream.completions_url,
            body=body,
            cast_to=object,
            options=call_options,
            stream=True,
            stream_cls=openai.AsyncStream[object],
        ),
        deadline,
    )
    gap_timeout = settings.OPENAI_TIMEOUT
    try:
        async with response:
            iterator = response.__aiter__()
            while True:
                try:
                    async with asyncio.timeout(gap_timeout):
                        chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                model = chunk.get("model") or model
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        parts.append(content)
                        yield Delta(content)
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
    except BaseException as exc:
        translated = _translate(exc)
        if parts and isinstance(translated, errors.UpstreamError):
            # Text was already delivered: the reply is cut short, whatever cut it.
            translated = errors.UpstreamTruncated(
                f"The reply stream broke off before the reply was finished ({translated.code})."
            )
        _reraise(exc, translated)
    if finish_reason is None:
        raise errors.UpstreamTruncated()
    prompt_tokens, completion_tokens = _usage_counts(usage)
    yield Completion(
        text="".join(parts),
        model=model,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_ms=int((time.monotonic() - started) * 1000),
    )


_KEY_SHAPED = re.compile(r"\b(sk|sess|org)-[A-Za-z0-9_\-*.]{4,}")


def redact(text: str) -> str:
    """Remove anything shaped like an API key from an upstream message before we store it."""
    return _KEY_SHAPED.sub("[redacted]", text)


def _upstream_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return redact(inner["message"])[:500]
    return f"HTTP {exc.status_code}"


def _reraise(exc: BaseException, translated: BaseException) -> typing.NoReturn:
    if translated is exc:
        raise exc
    raise translated from exc


def _is_disconnect(exc: BaseException) -> bool:
    """The aiohttp transport reports every connection error (refused, reset, closed) as a
    connect timeout; find the real cause so it is not answered as a 504."""
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, aiohttp.ClientConnectionError) and not isinstance(
            seen, (aiohttp.ServerTimeoutError, TimeoutError)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _translate(exc: BaseException) -> BaseException:
    """Map an SDK/transport exception onto our error family; leave anything else untouched."""
    if isinstance(exc, errors.ApplicationError):
        return exc
    if isinstance(exc, openai.APITimeoutError) and _is_disconnect(exc):
        return errors.UpstreamUnavailable("The model API closed the connection without answering.")
    if isinstance(exc, (TimeoutError, openai.APITimeoutError)):
        return errors.UpstreamTimeout()
    if isinstance(exc, openai.RateLimitError):
        retry_after = exc.response.headers.get("retry-after")
        headers = {"Retry-After": retry_after} if retry_after and retry_after.isdigit() else {}
        return errors.UpstreamRateLimited(
            extra={"upstream_status": 429, "retry_after": int(retry_after)} if headers else {},
            headers=headers,
        )
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return errors.UpstreamAuthenticationFailed(extra={"upstream_status": exc.status_code})
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500:
            return errors.UpstreamUnavailable(
                f"The model API failed with HTTP {exc.status_code}.",
                extra={"upstream_status": exc.status_code},
            )
        return errors.UpstreamRejected(
            f"The model API rejected the request: {_upstream_message(exc)}",
            extra={"upstream_status": exc.status_code},
        )
    if isinstance(exc, openai.APIResponseValidationError):
        return errors.UpstreamBadResponse()
    if isinstance(exc, openai.APIConnectionError):
        return errors.UpstreamUnavailable("The model API could not be reached.")
    if isinstance(
        exc, (openai.OpenAIError, ValueError, httpx2.HTTPError, AttributeError, TypeError)
    ):
        # JSON that does not parse, a body of the wrong shape, a stream cut mid-frame.
        return errors.UpstreamBadResponse()
    return exc
