"""The gateway to the model API: the only module that touches the `openai` SDK.

Calls go through the SDK's typed `client.chat.completions.create()`; its models give the reply,
the refusal and the usage their real types. The client is built from settings at call time
(never at import) and cached per event loop, because an `AsyncOpenAI` client's connection pool
is bound to the loop that first used it. SDK exceptions are translated here into the
`chat.errors` family, so nothing above this module knows the SDK exists; anything else (a bug of
ours, e.g. after an SDK upgrade) propagates as what it is.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
import types
import typing
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import httpx2
import openai
from django.conf import settings

from chat import errors, metrics, request_context

logger = logging.getLogger(__name__)

ChatTurn = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}
T = TypeVar("T")


@dataclass(frozen=True)
class Completion:
    text: str
    # The model's explanation when it declined to answer ("" otherwise).
    refusal: str
    model: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: int


@dataclass(frozen=True)
class Delta:
    """A piece of a streamed reply (or, with `refusal`, of the model's refusal)."""

    text: str
    refusal: bool = False


@dataclass(frozen=True)
class GenerationOptions:
    model: str
    temperature: float | None = None
    max_tokens: int | None = None

    @property
    def completion_token_cap(self) -> int:
        """The longest reply this call may produce: what it asked for, else the server's cap.
        Always sent upstream, so a reply never costs more than its budget reservation."""
        return self.max_tokens or settings.CHAT_MAX_COMPLETION_TOKENS

    def as_request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.model, "max_tokens": self.completion_token_cap}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        return kwargs


class _Upstream:
    """The SDK client of one event loop, and a digest of the settings it was built from (a
    digest, so that nothing of ours that could be logged or repr'd holds the API key)."""

    __slots__ = ("client", "settings_digest")

    def __init__(self, client: openai.AsyncOpenAI, settings_digest: str) -> None:
        self.client = client
        self.settings_digest = settings_digest

    def __repr__(self) -> str:
        return f"<_Upstream {self.client.base_url}>"


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Upstream] = (
    weakref.WeakKeyDictionary()
)


def is_configured() -> bool:
    return bool(settings.OPENAI_API_KEY)


def _settings_digest() -> str:
    values = (
        settings.OPENAI_API_KEY,
        settings.OPENAI_BASE_URL,
        settings.OPENAI_TIMEOUT,
        settings.OPENAI_MAX_CONNECTIONS,
        settings.OPENAI_HTTP_CLIENT,
    )
    return hashlib.sha256(repr(values).encode()).hexdigest()


def _upstream() -> _Upstream:
    """The client for the running event loop, rebuilt if the settings changed."""
    if not is_configured():
        raise errors.ServiceNotConfigured()
    loop = asyncio.get_running_loop()
    digest = _settings_digest()
    cached = _clients.get(loop)
    if cached is not None:
        if cached.settings_digest == digest:
            return cached
        # The settings changed: let the old client finish its requests, then close.
        _retire(cached.client)
    timeout = httpx2.Timeout(settings.OPENAI_TIMEOUT, connect=min(5.0, settings.OPENAI_TIMEOUT))
    limits = httpx2.Limits(
        max_connections=settings.OPENAI_MAX_CONNECTIONS,
        max_keepalive_connections=settings.OPENAI_MAX_CONNECTIONS,
    )
    http_client_class = (
        openai.DefaultAioHttpClient
        if settings.OPENAI_HTTP_CLIENT == "aiohttp"
        else openai.DefaultAsyncHttpxClient
    )
    client = openai.AsyncOpenAI(
        api_key=settings.OPENAI_API_KEY,
        base_url=settings.OPENAI_BASE_URL,
        timeout=timeout,
        max_retries=0,  # retried by _with_retries, within our deadline
        http_client=http_client_class(timeout=timeout, limits=limits),
    )
    upstream = _Upstream(client, digest)
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


async def _with_retries(call: Callable[[], Awaitable[T]], deadline: float) -> T:
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
        except Exception as exc:
            error = _translate(exc)
            if not isinstance(error, _RETRYABLE) or attempt >= settings.OPENAI_MAX_RETRIES:
                _reraise(exc, error)
            attempt += 1
            delay = _retry_delay(error, attempt)
            if asyncio.get_running_loop().time() + delay >= deadline:
                _reraise(exc, error)
            logger.info("upstream %s, retry %d in %.1fs", error.code, attempt, delay)
            await asyncio.sleep(delay)


def _bad_response(detail: str) -> errors.UpstreamBadResponse:
    return errors.UpstreamBadResponse(
        f"The model API sent a reply that is not a chat completion: {detail}."
    )


async def _create(messages: Sequence[ChatTurn], options: GenerationOptions, **stream: Any) -> Any:
    """`client.chat.completions.create()` for these messages, retried within OPENAI_TIMEOUT."""
    client = _upstream().client
    headers = _request_headers()
    deadline = asyncio.get_running_loop().time() + settings.OPENAI_TIMEOUT
    return await _with_retries(
        lambda: client.chat.completions.create(
            messages=list(messages),  # type: ignore[arg-type]
            extra_headers=headers,
            **options.as_request_kwargs(),
            **stream,
        ),
        deadline,
    )


async def complete(*, messages: Sequence[ChatTurn], options: GenerationOptions) -> Completion:
    """One non-streaming chat completion; OPENAI_TIMEOUT bounds it, retries included."""
    with _ObservedCall(options.model) as call:
        response = await _create(messages, options)
        if not response.choices:
            raise _bad_response("no choices")
    choice = response.choices[0]
    usage = response.usage
    return Completion(
        text=choice.message.content or "",
        refusal=choice.message.refusal or "",
        model=response.model or options.model,
        finish_reason=choice.finish_reason,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        latency_ms=call.elapsed_ms(),
    )


async def stream(
    *, messages: Sequence[ChatTurn], options: GenerationOptions
) -> AsyncIterator[Delta | Completion]:
    """Yield the reply as `Delta`s, then one `Completion` with the whole text and the usage.

    OPENAI_TIMEOUT bounds the wait for the stream to start (retries included) and every gap
    between chunks, not the whole generation. A stream that ends without a finish_reason raises
    `UpstreamTruncated`.
    """
    with _ObservedCall(options.model) as call:
        response = await _create(
            messages, options, stream=True, stream_options={"include_usage": True}
        )
        parts: list[str] = []
        refusal_parts: list[str] = []
        finish_reason: str | None = None
        model = options.model
        usage = None
        try:
            async with response:
                chunks = response.__aiter__()
                while True:
                    try:
                        async with asyncio.timeout(settings.OPENAI_TIMEOUT):
                            chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    model = chunk.model or model
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        if not (parts or refusal_parts) and (
                            choice.delta.content or choice.delta.refusal
                        ):
                            call.first_token()
                        if choice.delta.content:
                            parts.append(choice.delta.content)
                            yield Delta(choice.delta.content)
                        if choice.delta.refusal:
                            refusal_parts.append(choice.delta.refusal)
                            yield Delta(choice.delta.refusal, refusal=True)
                        if choice.finish_reason:
                            finish_reason = choice.finish_reason
        except Exception as exc:
            translated = _translate(exc)
            if (parts or refusal_parts) and isinstance(translated, errors.UpstreamError):
                # Text was already delivered: the reply is cut short, whatever cut it.
                translated = errors.UpstreamTruncated(
                    f"The reply stream broke off before the reply was finished ({translated.code})."
                )
            _reraise(exc, translated)
        if finish_reason is None:
            raise errors.UpstreamTruncated()
    yield Completion(
        text="".join(parts),
        refusal="".join(refusal_parts),
        model=model,
        finish_reason=finish_reason,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        latency_ms=call.elapsed_ms(),
    )


def _request_headers() -> dict[str, str] | None:
    """Headers of our own on a model API call: the id of the request it is made for."""
    request_id = request_context.get_request_id()
    return {request_context.HEADER: request_id} if request_id else None


class _ObservedCall:
    """Times one model call (retries included) into chat_upstream_request_duration_seconds,
    labelled with its outcome: ok, the error code, or cancelled; and, for streams, the time to
    the first piece of text."""

    __slots__ = ("model", "started")

    def __init__(self, model: str) -> None:
        self.model = model
        self.started = time.monotonic()

    def __enter__(self) -> _ObservedCall:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, errors.ApplicationError):
            outcome = exc.code
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            outcome = "cancelled"
        else:
            outcome = "internal_error"
        metrics.observe_upstream_call(
            model=self.model, outcome=outcome, seconds=time.monotonic() - self.started
        )
        return None

    def first_token(self) -> None:
        metrics.observe_first_token(model=self.model, seconds=time.monotonic() - self.started)

    def elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)


def _upstream_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return errors.redact_secrets(inner["message"])[:500]
    return f"HTTP {exc.status_code}"


def _reraise(exc: BaseException, translated: BaseException) -> typing.NoReturn:
    if translated is exc:
        raise exc
    raise translated from exc


def _is_disconnect(exc: BaseException) -> bool:
    """The aiohttp client reports every connection error (refused, reset, closed) as a connect
    timeout; find the real cause so it is not answered as a 504."""
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
        retry_after = exc.response.headers.get("retry-after") or ""
        if not retry_after.isdigit():
            return errors.UpstreamRateLimited()
        return errors.UpstreamRateLimited(
            extra={"upstream_status": 429, "retry_after": int(retry_after)},
            headers={"Retry-After": retry_after},
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
        return _bad_response("its body does not match the API's schema")
    if isinstance(exc, openai.APIConnectionError):
        return errors.UpstreamUnavailable("The model API could not be reached.")
    if isinstance(exc, json.JSONDecodeError):
        return _bad_response("its body is not valid JSON")
    if isinstance(exc, httpx2.TransportError):
        # A streamed body cut mid-way (connection reset, incomplete chunked encoding...).
        return errors.UpstreamUnavailable("The connection to the model API broke.")
    return exc
