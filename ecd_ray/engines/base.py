"""The one small interface every text-generation backend implements.

A request is a chat (list of ``{role, content}``) plus sampling settings and a stable id; a
result is text, token counts and a finish reason. Engines are plain classes: the Ray wiring
(actor pools, placement groups) lives in :mod:`ecd_ray.pipeline`.
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


@dataclass(frozen=True)
class GenerationResult:
    """What an engine returns for one request; ``finish_reason`` is "stop" or "length", or
    "error" when the engine gave up on the request (``error`` then says why)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    error: str | None = None


class Engine(Protocol):
    """A text-generation backend; ``generate`` returns one result per request, in order."""

    model_name: str

    def generate(self, requests: list[ChatRequest]) -> list[GenerationResult]: ...

    def close(self) -> None: ...


def request_seed(global_seed: int, request_id: str) -> int:
    """A 31-bit sampler seed derived from the run's seed and a request id."""
    digest = hashlib.sha256(f"{global_seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
