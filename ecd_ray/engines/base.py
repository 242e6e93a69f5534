"""The one small interface every text-generation backend implements.

A request is a chat (list of ``{role, content}``) plus sampling settings and a stable id; a
result is text, token counts and a finish reason. Engines are plain classes: the Ray wiring
(actor pools, placement groups) lives in :mod:`ecd_ray.pipeline`.

Two ways in:

* ``generate(requests)``: a blocking call over a list (evaluation, benchmarks' ceilings).
* ``await agenerate(request)``: one request at a time from a running asyncio loop; the engine
  batches whatever is in flight (vLLM's continuous batching, the transformers engine's dynamic
  batches, concurrent HTTP). The chain scheduler uses this so that no chain waits for another.

A request the engine cannot serve (prompt over the context limit, tokenizer failure, engine
error) comes back as a result with ``finish_reason="error"``, ``error_code`` and ``error``;
it never raises and never fails other requests.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Protocol


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request. ``seed`` makes sampled outputs reproducible."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class ChatRequest:
    """One chat to answer; ``request_id`` is stable across runs (it seeds the sampler)."""

    request_id: str
    messages: list[dict[str, str]]
    sampling: Sampling


# Machine-readable codes of requests an engine refused (the reject reasons they become).
PROMPT_TOO_LONG = "prompt_too_long"
TOKENIZER_ERROR = "tokenizer_error"
ENGINE_ERROR = "engine_error"
TIMEOUT = "timeout"  # a remote engine did not answer within its timeout, on every attempt
INVALID_UTF8 = "invalid_utf8"  # a remote engine's response body is not valid UTF-8


@dataclass(frozen=True)
class GenerationResult:
    """What an engine returns for one request; ``finish_reason`` is "stop" or "length", or
    "error" when the engine gave up on the request (``error_code`` and ``error`` say why)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    error: str | None = None
    error_code: str | None = None


def failed(code: str, detail: str, prompt_tokens: int = 0) -> GenerationResult:
    """The result of a request the engine refused or could not finish."""
    return GenerationResult("", prompt_tokens, 0, "error", error=detail, error_code=code)


def too_long(prompt_tokens: int, max_new_tokens: int, limit: int, setting: str
             ) -> GenerationResult | None:
    """A ``prompt_too_long`` result when prompt + new tokens exceed the context ``limit``
    (``setting`` names the config key that sets it), else None."""
    if prompt_tokens + max_new_tokens <= limit:
        return None
    return failed(PROMPT_TOO_LONG, f"{prompt_tokens} prompt tokens + {max_new_tokens} new "
                  f"tokens > {limit} ({setting})", prompt_tokens)


class Engine(Protocol):
    """A text-generation backend; ``generate`` returns one result per request, in order."""

    model_name: str

    def generate(self, requests: list[ChatRequest]) -> list[GenerationResult]: ...

    def close(self) -> None: ...


class AsyncEngine(Protocol):
    """An engine the chain scheduler drives one request at a time.

    ``capacity`` is how many requests it wants in flight to run at full speed (vLLM's
    ``max_num_seqs``, the transformers engine's batch size, the HTTP concurrency).
    """

    model_name: str
    capacity: int

    async def agenerate(self, request: ChatRequest) -> GenerationResult: ...

    def close(self) -> None: ...


def request_seed(global_seed: int, request_id: str) -> int:
    """A 31-bit sampler seed derived from the run's seed and a request id."""
    digest = hashlib.sha256(f"{global_seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
