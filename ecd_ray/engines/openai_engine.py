"""The ``openai`` engine: any OpenAI-compatible ``/v1/chat/completions`` endpoint (a vLLM
server, a hosted teacher) behind the :class:`~ecd_ray.engines.base.Engine` interface.

``generate`` is synchronous (the pipeline calls it from a Ray actor); inside, an asyncio loop
keeps up to ``concurrency`` requests in flight with aiohttp. Failures that may pass (HTTP 429,
5xx, timeouts, dropped connections) are retried with exponential back-off and full jitter,
seeded by the request id so runs are reproducible; ``Retry-After`` is honoured. Other errors
(400, 401, 404, a body that is not UTF-8 or not a completion) are not retried. A request that
cannot be answered comes back as a result with ``finish_reason="error"``, ``error`` and
``error_code`` set (``timeout`` when the last attempt timed out, ``invalid_utf8``,
``prompt_too_long``, else ``engine_error``); it never fails the rest of the batch.

The API key is read from the environment variable the config *names*; it is sent only in the
``Authorization`` header and never appears in reprs, logs or error messages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import json
import logging
import os
import random
import time
from typing import Any

import aiohttp

from ecd_ray.config import OpenAIConfig
from ecd_ray.engines.base import (
    ENGINE_ERROR,
    INVALID_UTF8,
    PROMPT_TOO_LONG,
    TIMEOUT,
    ChatRequest,
    GenerationResult,
    failed,
)

log = logging.getLogger(__name__)

# Connection trouble worth another attempt (ServerDisconnectedError is a
# ClientConnectionError; ClientPayloadError is a response cut off part-way).
RETRYABLE_EXCEPTIONS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                        asyncio.TimeoutError)
_MAX_ERROR_CHARS = 300


class _Retry(Exception):  # noqa: N818 - control flow, not an error
    """An attempt failed in a way that may pass; ``retry_after`` is the server's hint (s)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Fail(Exception):  # noqa: N818 - control flow, not an error
    """An attempt failed in a way another attempt cannot fix; ``code`` is the result's
    ``error_code``."""

    def __init__(self, reason: str, code: str = ENGINE_ERROR):
        super().__init__(reason)
        self.code = code


def is_retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(rng: random.Random, attempt: int, base: float, cap: float,
                  retry_after: float | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0 = the first retry): the server's
    ``Retry-After`` when given, else full jitter on ``base * 2**attempt``; both capped."""
    if retry_after is not None:
        return min(cap, retry_after)
    return rng.uniform(0.0, min(cap, base * 2.0**attempt))


def finish_reason(raw: str | None) -> str:
    return "length" if raw == "length" else "stop"


class OpenAIEngine:
    """Chat generation against an OpenAI-compatible server."""

    def __init__(self, cfg: OpenAIConfig, *, model_name: str):
        self.cfg = cfg
        self.model_name = model_name
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.capacity = cfg.concurrency
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        # Never the key itself: only the name of the variable it came from.
        return (f"OpenAIEngine(url={self.url!r}, model={self.model_name!r}, "
                f"api_key_env={self.cfg.api_key_env!r}, api_key_set={self._api_key is not None},"
                f" concurrency={self.cfg.concurrency}, max_retries={self.cfg.max_retries})")

    __str__ = __repr__

    # -- the Engine interface -----------------------------------------------------------------

    def generate(self, requests: list[ChatRequest]) -> list[GenerationResult]:
        """One result per request, in order; failed requests come back with ``error`` set."""
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._generate(requests))
        # Called from inside a running event loop (an async actor): run ours in a thread.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self._generate(requests)).result()

    async def agenerate(self, request: ChatRequest) -> GenerationResult:
        """One request on a session shared by every request in flight (at most
        ``concurrency`` at once); a failure comes back as a result with ``error`` set."""
        if self._session is None or self._session.closed:
            self._sem = asyncio.Semaphore(self.cfg.concurrency)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.cfg.concurrency),
                headers=self._headers())
        return await self._request(self._session, self._sem or asyncio.Semaphore(1), request)

    def close(self) -> None:
        """Close the shared session of ``agenerate`` (``generate`` opens its own each call)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            try:
                asyncio.get_running_loop().create_task(session.close())
            except RuntimeError:
                asyncio.run(session.close())

    # -- internals ----------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _redact(self, text: str) -> str:
        """``text`` cut short, with the key removed should a server ever echo it back (removed
        first: a cut through the key would leave its first characters)."""
        text = text.replace(self._api_key, "[redacted]") if self._api_key else text
        return text[:_MAX_ERROR_CHARS]

    def _body(self, req: ChatRequest) -> dict[str, Any]:
        s = req.sampling
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": req.messages,
            "temperature": s.temperature,
            "top_p": s.top_p if s.temperature > 0 else 1.0,
            "max_tokens": s.max_new_tokens,
            "seed": s.seed,
        }
        if s.min_new_tokens > 0:
            body["min_tokens"] = s.min_new_tokens  # a vLLM extension of the OpenAI API
        return body

    async def _generate(self, requests: list[ChatRequest]) -> list[GenerationResult]:
        sem = asyncio.Semaphore(self.cfg.concurrency)
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        connector = aiohttp.TCPConnector(limit=self.cfg.concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                         headers=self._headers()) as session:
            return list(await asyncio.gather(*(self._request(session, sem, r)
                                               for r in requests)))

    async def _request(self, session: aiohttp.ClientSession, sem: asyncio.Semaphore,
                       req: ChatRequest) -> GenerationResult:
        rng = random.Random(f"backoff:{req.request_id}")  # str seeds hash stably (sha512)
        body = self._body(req)
        attempts = self.cfg.max_retries + 1
        last, code = "", ENGINE_ERROR
        for attempt in range(attempts):
            try:
                async with sem:  # held only while a request is in flight, not while waiting
                    return await self._attempt(session, body)
            except _Fail as exc:
                return self._failed(req, str(exc), exc.code)
            except asyncio.CancelledError:
                raise
            except _Retry as exc:
                last, code, retry_after = exc.reason, ENGINE_ERROR, exc.retry_after
            except RETRYABLE_EXCEPTIONS as exc:
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                last, retry_after = self._redact(detail), None
                # aiohttp's total and socket timeouts are both asyncio.TimeoutError
                code = TIMEOUT if isinstance(exc, asyncio.TimeoutError) else ENGINE_ERROR
            if attempt + 1 == attempts:
                break
            delay = backoff_delay(rng, attempt, self.cfg.backoff_base_s, self.cfg.backoff_max_s,
                                  retry_after)
            log.info("openai request %s: attempt %d/%d failed (%s); retrying in %.2f s",
                     req.request_id, attempt + 1, attempts, last, delay)
            await asyncio.sleep(delay)
        return self._failed(req, f"gave up after {attempts} attempt(s): {last}", code)

    async def _attempt(self, session: aiohttp.ClientSession, body: dict[str, Any]
                       ) -> GenerationResult:
        async with session.post(self.url, json=body) as resp:
            raw = await resp.read()
            if resp.status != 200:
                reason = self._redact(f"HTTP {resp.status}: "
                                      f"{raw.decode('utf-8', 'replace').strip()}")
                if is_retryable_status(resp.status):
                    raise _Retry(reason, parse_retry_after(resp.headers.get("Retry-After")))
                raise _Fail(reason)
        try:
            # JSON is UTF-8 (RFC 8259). Bytes that are not would reach the training data as
            # U+FFFD if replaced: the answer is refused instead (a retry sends the same seed).
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Fail(self._redact(f"response body is not UTF-8 ({exc.reason} at byte "
                                     f"{exc.start}: {raw[exc.start:exc.start + 8]!r})"),
                        INVALID_UTF8) from None
        try:
            data = json.loads(text)
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return GenerationResult(
                text=(choice.get("message") or {}).get("content") or "",
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                finish_reason=finish_reason(choice.get("finish_reason")),
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _Fail(self._redact(f"malformed response ({type(exc).__name__}): "
                                     f"{text.strip()}")) from None

    def _failed(self, req: ChatRequest, reason: str, code: str = ENGINE_ERROR
                ) -> GenerationResult:
        # A server's refusal of an over-long prompt (vLLM: "maximum context length") is the
        # same reject as the local engines' length check.
        lowered = reason.lower()
        if code == ENGINE_ERROR and ("context length" in lowered or "too long" in lowered):
            code = PROMPT_TOO_LONG
        log.warning("openai request %s failed (%s): %s", req.request_id, code, reason)
        return failed(code, reason)
