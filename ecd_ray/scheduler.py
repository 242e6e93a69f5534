"""Continuous chain scheduling (plain asyncio, no Ray): each chain advances on its own.

A chain's requests depend on each other (answer I0, evolve, answer I1, ...), so a batch of
seeds must never advance in lock-step. :class:`ChainScheduler` runs every chain as its own
coroutine: when a request finishes, that chain's next request goes to the engine at once,
and new chains are admitted while fewer than ``max_chains`` are in flight. The engine
(:class:`~ecd_ray.engines.base.AsyncEngine`) batches whatever is in flight.

``mode="lockstep"`` is the old step-barrier scheduling, kept to measure what it costs: chains
are taken ``batch_size`` at a time and every step waits for the batch's slowest request.

The scheduler counts requests in flight over time (``occupancy``), tokens and results, so a
benchmark can plot engine occupancy; it has no other side effects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ecd_ray.engines.base import AsyncEngine, GenerationResult
from ecd_ray.evolution import Chain, ChainSettings, PendingRequest

Mode = Literal["continuous", "lockstep"]
Seeds = Iterable[dict[str, Any]] | AsyncIterable[dict[str, Any]]


async def _aiter(seeds: Seeds) -> AsyncIterator[dict[str, Any]]:
    if isinstance(seeds, AsyncIterable):
        async for seed in seeds:
            yield seed
    else:
        for seed in seeds:
            yield seed


@dataclass
class SchedulerStats:
    """Running counters of one scheduler; ``occupancy`` holds (seconds, requests in flight)
    samples taken whenever the number in flight changes."""

    started: float = field(default_factory=time.perf_counter)
    requests: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    errors: int = 0
    in_flight: int = 0
    chains_in_flight: int = 0
    chains_done: int = 0
    occupancy: list[tuple[float, int]] = field(default_factory=list)
    record_occupancy: bool = False

    def _sample(self) -> None:
        if self.record_occupancy:
            self.occupancy.append((time.perf_counter() - self.started, self.in_flight))

    def sent(self) -> None:
        self.in_flight += 1
        self.requests += 1
        self._sample()

    def received(self, res: GenerationResult) -> None:
        self.in_flight -= 1
        self.completion_tokens += res.completion_tokens
        self.prompt_tokens += res.prompt_tokens
        self.errors += res.finish_reason == "error"
        self._sample()


class ChainScheduler:
    """Runs chains through a teacher engine, optionally a separate evolver engine, the APC
    responders' engines (``responders``: name -> engine) and an APC judge (default: the
    teacher).

    ``on_done(chain)`` is called for every finished chain, in the order chains finish.
    """

    def __init__(self, engine: AsyncEngine, settings: ChainSettings, *,
                 evolver: AsyncEngine | None = None,
                 responders: dict[str, AsyncEngine] | None = None,
                 judge: AsyncEngine | None = None, mode: Mode = "continuous",
                 max_chains: int | None = None, batch_size: int = 16,
                 clock: Callable[[], float] = time.perf_counter):
        self.engine = engine
        self.evolver = evolver or engine
        self.responders = responders or {}
        self.judge = judge or engine
        self.settings = settings
        self.mode = mode
        # Enough chains to keep the engine full: each chain has at most one request in flight.
        self.max_chains = max_chains or 2 * max(engine.capacity, self.evolver.capacity)
        self.batch_size = batch_size
        self.stats = SchedulerStats()
        self.stats.started = clock()
        self._clock = clock

    def new_chain(self, seed: dict[str, Any]) -> Chain:
        return Chain(seed, self.settings)

    async def _send(self, pending: PendingRequest) -> GenerationResult:
        if pending.role == "answer":
            engine = self.engine
        elif pending.role.startswith("respond:"):
            engine = self.responders[pending.role.split(":", 1)[1]]
        elif pending.role == "judge":
            engine = self.judge
        else:
            engine = self.evolver
        self.stats.sent()
        try:
            res = await engine.agenerate(pending.request)
        except BaseException:
            self.stats.in_flight -= 1  # a cancelled request (stop) keeps the count right
            raise
        self.stats.received(res)
        return res

    async def run_chain(self, chain: Chain) -> Chain:
        """Drive one chain to its end, one request at a time."""
        while (pending := chain.next_request()) is not None:
            chain.apply(await self._send(pending))
        return chain

    async def run(self, seeds: Seeds,
                  on_done: Callable[[Chain], None]) -> None:
        """Run a chain for every seed row; ``on_done`` receives each finished chain."""
        if self.mode == "lockstep":
            await self._run_lockstep(seeds, on_done)
        else:
            await self._run_continuous(seeds, on_done)

    async def _run_continuous(self, seeds: Seeds,
                              on_done: Callable[[Chain], None]) -> None:
        slots = asyncio.Semaphore(self.max_chains)
        tasks: set[asyncio.Task[Chain]] = set()

        async def one(seed: dict[str, Any]) -> Chain:
            try:
                chain = await self.run_chain(self.new_chain(seed))
                self.stats.chains_done += 1
                on_done(chain)
                return chain
            finally:
                self.stats.chains_in_flight -= 1
                slots.release()

        try:
            async for seed in _aiter(seeds):
                await slots.acquire()
                self.stats.chains_in_flight += 1
                task = asyncio.create_task(one(seed))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _run_lockstep(self, seeds: Seeds,
                            on_done: Callable[[Chain], None]) -> None:
        batch: list[Chain] = []
        async for seed in _aiter(seeds):
            batch.append(self.new_chain(seed))
            if len(batch) == self.batch_size:
                await self._lockstep_batch(batch, on_done)
                batch = []
        if batch:
            await self._lockstep_batch(batch, on_done)

    async def _lockstep_batch(self, batch: list[Chain], on_done: Callable[[Chain], None]
                              ) -> None:
        self.stats.chains_in_flight += len(batch)
        live = batch
        while live:
            pending = [(c, c.next_request()) for c in live]
            live = [c for c, p in pending if p is not None]
            steps = [p for _, p in pending if p is not None]
            results = await asyncio.gather(*(self._send(p) for p in steps))  # the barrier
            for chain, res in zip(live, results, strict=True):
                chain.apply(res)
        for chain in batch:
            self.stats.chains_done += 1
            on_done(chain)
        self.stats.chains_in_flight -= len(batch)
