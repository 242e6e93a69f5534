"""The ``openai`` engine: any OpenAI-compatible ``/v1/chat/completions`` endpoint (a vLLM
server, a hosted teacher) behind the :class:`~ecd_ray.engines.base.Engine` interface.

``generate`` is synchronous (the pipeline calls it from a Ray actor); inside, an asyncio loop
keeps up to ``concurrency`` requests in flight with aiohttp. Failures that may pass (HTTP 429,
5xx, timeouts, dropped connections) are retried with exponential back-off and full jitter,
seeded by the request id so runs are reproducible; ``Retry-After`` is honoured. Other errors
(400, 401, 404, ...) are not retried. A request that cannot be answered comes back as a result
with ``finish_reason="error"`` and ``error`` set; it never fails the rest of the batch.

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
    PROMPT_TOO_LONG,
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
    """An attempt failed in a way another attempt cannot fix."""


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
        """``text`` cut short, with the key removed should a server ever echo it back."""
        text = text[:_MAX_ERROR_CHARS]
        return text.replace(self._api_key, "[redacted]") if self._api_key else text

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
        last = ""
        for attempt in range(attempts):
            try:
                async with sem:  # held only while a request is in flight, not while waiting
                    return await self._attempt(session, body)
            except _Fail as exc:
                return self._failed(req, str(exc))
            except asyncio.CancelledError:
                raise
            except _Retry as exc:
                last, retry_after = exc.reason, exc.retry_after
            except RETRYABLE_EXCEPTIONS as exc:
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                last, retry_after = self._redact(detail), None
            if attempt + 1 == attempts:
                break
            delay = backoff_delay(rng, attempt, self.cfg.backoff_base_s, self.cfg.backoff_max_s,
                                  retry_after)
            log.info("openai request %s: attempt %d/%d failed (%s); retrying in %.2f s",
                     req.request_id, attempt + 1, attempts, last, delay)
            await asyncio.sleep(delay)
        return self._failed(req, f"gave up after {attempts} attempt(s): {last}")

    async def _attempt(self, session: aiohttp.ClientSession, body: dict[str, Any]
                       ) -> GenerationResult:
        async with session.post(self.url, json=body) as resp:
            text = await resp.text()
            if resp.status != 200:
                reason = self._redact(f"HTTP {resp.status}: {text.strip()}")
                if is_retryable_status(resp.status):
                    raise _Retry(reason, parse_retry_after(resp.headers.get("Retry-After")))
                raise _Fail(reason)
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

    def _failed(self, req: ChatRequest, reason: str) -> GenerationResult:
        log.warning("openai request %s failed: %s", req.request_id, reason)
        # A server's refusal of an over-long prompt (vLLM: "maximum context length") is the
        # same reject as the local engines' length check.
        lowered = reason.lower()
        code = PROMPT_TOO_LONG if ("context length" in lowered or "too long" in lowered) \
            else ENGINE_ERROR
        return failed(code, reason)
