"""The generation actor: one teacher engine, many chains in flight, atomic streaming shards.

A plain class that the driver (:mod:`ecd_ray.pipeline.generate`) turns into an async Ray actor.
The driver ``submit``s seeds; the actor's :class:`~ecd_ray.scheduler.ChainScheduler` runs them
continuously; finished chains are verified and written to ``evolutions/`` in atomic shards
(temporary file, then rename) of at most ``scheduler.flush_rows`` chains or after
``scheduler.flush_seconds``. ``poll`` reports the written shards and live counters.

Shard names carry the actor index and this incarnation's id, so after a crash the driver can
find the shards an actor wrote but never reported.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ecd_ray import schema
from ecd_ray.config import EngineConfig, RunConfig
from ecd_ray.engines.base import AsyncEngine, Sampling
from ecd_ray.evolution import Chain, ChainSettings, ResponderSpec
from ecd_ray.pipeline import manifest as mf
from ecd_ray.scheduler import ChainScheduler
from ecd_ray.verify import annotate_levels

log = logging.getLogger(__name__)
_END = None  # end-of-input marker in the seed queue


# A write that fails with one of these found the disk (or the user's quota) full: restarting
# the actor cannot help, so the run stops and is resumed once there is space.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_no_space(exc: BaseException) -> bool:
    """True when ``exc``, or an exception it was raised from (Ray's task errors included), is a
    full disk or quota."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True  # an error that kept only the message (Arrow's, Ray's)
        cause = getattr(e, "cause", None)
        todo += [e.__cause__, e.__context__, cause if isinstance(cause, BaseException) else None]
    return False


def shard_prefix(actor_index: int) -> str:
    """File-name prefix of every evolutions shard written by actor ``actor_index``."""
    return f"part-{actor_index:03d}-"


def build_async_engine(cfg: EngineConfig, *, seed: int, scratch: Path) -> AsyncEngine:
    """The engine ``cfg`` names, for the chain scheduler (call inside a running loop)."""
    from ecd_ray.engines import resolve_engine_name

    name = resolve_engine_name(cfg.engine)
    if name == "openai":
        from ecd_ray.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(cfg.openai, model_name=cfg.openai.model_name or cfg.model)
    from ecd_ray.models import resolve_model

    model_dir = resolve_model(cfg.model)
    if name == "vllm":
        from ecd_ray.engines.vllm_engine import AsyncVLLMEngine

        return AsyncVLLMEngine(model_dir, cfg.vllm, dtype=cfg.dtype,
                               num_cpus=max(1, int(cfg.num_cpus)), seed=seed, scratch=scratch,
                               model_name=cfg.model, trust_remote_code=cfg.trust_remote_code)
    from ecd_ray.engines.hf import TransformersEngine

    return TransformersEngine(model_dir, dtype=cfg.dtype, max_batch=cfg.batch_size,
                              threads=cfg.threads, model_name=cfg.model,
                              trust_remote_code=cfg.trust_remote_code)


def _redirect_output(path: Path) -> None:
    """Send this process's stdout/stderr (and its children's: vLLM's engine core) to a file,
    so engine and library logs stay out of the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class ChainActor:
    """Holds one teacher engine and runs chains for the seeds the driver submits."""

    def __init__(self, cfg_json: str, run_dir: str, actor_index: int, verbose: bool = False):
        self.cfg = RunConfig.model_validate_json(cfg_json)
        self.run_dir = Path(run_dir)
        self.index = actor_index
        self.incarnation = uuid.uuid4().hex[:8]
        if not verbose:
            _redirect_output(self.run_dir / "logs" / f"actor-{actor_index:03d}.log")
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
        import ray

        self.worker = f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}"
        self.engine: AsyncEngine | None = None
        self.scheduler: ChainScheduler | None = None
        # asyncio objects are made in start(), on the actor's event loop (Ray runs __init__
        # in another thread; a queue made there never wakes its consumer).
        self._queue: asyncio.Queue[dict[str, Any] | None] | None = None
        self._buffer: list[dict[str, Any]] = []
        self._oldest: float | None = None
        self._shards: list[dict[str, Any]] = []
        self._written = 0
        self._seq = 0
        self._received = 0
        self._info: dict[str, Any] | None = None
        self._occupancy: list[tuple[float, int, int, int]] = []
        self._expected: int | None = None
        self._ended = False
        self._news: asyncio.Event | None = None
        self._error: str | None = None
        self._disk_full: str | None = None  # a write found no space: the run must stop
        self._tasks: list[asyncio.Task[None]] = []
        self._flush_lock: asyncio.Lock | None = None
        self.responders: dict[str, AsyncEngine] = {}  # APC responders' engines, by name
        self.judge_engine: AsyncEngine | None = None  # apc.judge's engine (None: the teacher)

    # -- driver-facing methods --------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        """Build the engine(s) and start scheduling; returns what the manifest records.
        Idempotent: a repeated call (the driver retries across a restart) returns the same."""
        if self._info is not None:
            return self._info
        self._queue, self._news, self._flush_lock = asyncio.Queue(), asyncio.Event(), \
            asyncio.Lock()
        cfg, t = self.cfg, self.cfg.teacher
        scratch = self.run_dir / "scratch"
        started = time.perf_counter()
        self.engine = build_async_engine(t, seed=cfg.seed, scratch=scratch)
        evolver = None
        if cfg.evolver is not None and cfg.evolution.mode == "teacher":
            evolver = build_async_engine(cfg.evolver, seed=cfg.seed, scratch=scratch)
        answer = Sampling(temperature=t.temperature, top_p=t.top_p,
                          max_new_tokens=t.max_new_tokens, min_new_tokens=t.min_new_tokens)
        # APC responders live in this actor beside the teacher and share its resources.
        specs = []
        for r in cfg.responders():
            if not r.from_teacher:
                self.responders[r.name] = build_async_engine(r, seed=cfg.seed, scratch=scratch)
            specs.append(ResponderSpec(
                r.name, r.rank, self.engine.model_name if r.from_teacher else r.model,
                answer if r.from_teacher else Sampling(
                    temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                    min_new_tokens=r.min_new_tokens), r.from_teacher))
        judge = None
        if cfg.strategy != "ecd" and "judge" in cfg.apc.filter:
            j = cfg.apc.judge
            judge = (Sampling(temperature=0.0, max_new_tokens=8) if j is None else Sampling(
                temperature=j.temperature, top_p=j.top_p, max_new_tokens=j.max_new_tokens))
            if j is not None:
                self.judge_engine = build_async_engine(j, seed=cfg.seed, scratch=scratch)
        regenerate = None
        if cfg.pairs.truncated_chosen == "regenerate":
            regenerate = cfg.pairs.regenerate_max_new_tokens or 2 * t.max_new_tokens
        settings = ChainSettings.build(cfg.evolution, rounds=cfg.rounds, seed=cfg.seed,
                                       answer=answer, system_prompt=t.system_prompt,
                                       answer_model=self.engine.model_name,
                                       strategy=cfg.strategy, responders=tuple(specs),
                                       apc_fraction=cfg.apc.fraction,
                                       regenerate_max_new_tokens=regenerate, judge=judge,
                                       rank_pairs=cfg.apc.rank_pairs)
        s = cfg.scheduler
        self.scheduler = ChainScheduler(self.engine, settings, evolver=evolver,
                                        responders=self.responders, judge=self.judge_engine,
                                        mode=s.mode,
                                        max_chains=s.max_chains_per_actor,
                                        batch_size=t.batch_size)
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._timer())]
        self._info = {
            "incarnation": self.incarnation, "pid": os.getpid(), "worker": self.worker,
            "capacity": self.engine.capacity, "max_chains": self.scheduler.max_chains,
            "engine": type(self.engine).__name__,
            "dtype": getattr(self.engine, "dtype", getattr(self.engine, "dtype_name", None)),
            "dtype_reason": getattr(self.engine, "dtype_reason", None),
            "start_s": round(time.perf_counter() - started, 1),
        }
        return self._info

    async def submit(self, seeds: list[dict[str, Any]]) -> int:
        """Queue seeds (rows of ``schema.SEEDS``); returns the queue length."""
        for seed in seeds:
            self._queue.put_nowait(seed)
        self._received += len(seeds)
        self._maybe_end()
        return self._queue.qsize()

    async def poll(self, timeout_s: float = 1.0) -> dict[str, Any]:
        """Shards written since the last poll and live counters; waits up to ``timeout_s``
        for news. Raises if the scheduler failed."""
        if self._news is None:  # not started yet (a poll can overtake start after a restart)
            await asyncio.sleep(timeout_s)
            return {"incarnation": None, "shards": [], "in_flight_chains": 0,
                    "in_flight_requests": 0, "queued": 0, "completion_tokens": 0, "requests": 0}
        if not self._shards and self._error is None and self._disk_full is None:
            try:
                await asyncio.wait_for(self._news.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        self._news.clear()
        if self._error is not None:
            raise RuntimeError(f"chain actor {self.index} failed: {self._error}")
        shards, self._shards = self._shards, []
        st = self.scheduler.stats if self.scheduler else None
        return {
            "incarnation": self.incarnation,
            "shards": shards,
            "in_flight_chains": st.chains_in_flight if st else 0,
            "in_flight_requests": st.in_flight if st else 0,
            "queued": self._queue.qsize(),
            "completion_tokens": st.completion_tokens if st else 0,
            "requests": st.requests if st else 0,
            "disk_full": self._disk_full,
        }

    async def end_input(self, expected: int) -> None:
        """No more seeds will come after the ``expected``-th (counted over this incarnation's
        submits): a lock-step batch may then run short. Ray does not order the calls of an
        async actor, so the end waits until that many seeds have arrived."""
        self._expected = expected
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self._expected is not None and self._received >= self._expected and \
                not self._ended:
            self._ended = True
            self._queue.put_nowait(_END)

    async def flush(self) -> int:
        """Write every finished chain now (before a stop); returns the chains written."""
        await self._flush()
        return self._written

    async def close(self) -> None:
        """End of input: finish nothing new, stop the engine."""
        for task in self._tasks:
            task.cancel()
        if self.engine is not None:
            self.engine.close()
        for engine in [*self.responders.values(), self.judge_engine]:
            if engine is not None:
                engine.close()

    def pid(self) -> int:
        return os.getpid()

    # -- internals ----------------------------------------------------------------------------

    async def _seeds(self):  # type: ignore[no-untyped-def]
        while (seed := await self._queue.get()) is not _END:
            yield seed

    async def _run(self) -> None:
        if self.scheduler is None:
            raise RuntimeError("start() builds the scheduler before it runs")
        try:
            await self.scheduler.run(self._seeds(), self._finished)
            await self._flush()  # end of input: nothing is left to wait for
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - reported to the driver, then fatal
            log.exception("chain scheduler failed")
            self._error = f"{type(exc).__name__}: {exc}"
            self._news.set()

    def _finished(self, chain: Chain) -> None:
        row = chain.to_row()
        row["worker"] = self.worker
        self._buffer.append(row)
        self._oldest = self._oldest or time.monotonic()
        if len(self._buffer) >= self.cfg.scheduler.flush_rows:
            asyncio.get_running_loop().create_task(self._flush())

    async def _timer(self) -> None:
        """Flush on age, and sample engine occupancy (requests in flight) twice a second."""
        wait = self.cfg.scheduler.flush_seconds
        tick = min(0.5, wait / 4)
        while True:
            await asyncio.sleep(tick)
            self._sample_occupancy()
            idle = self._queue is not None and self._queue.empty() and \
                self.scheduler is not None and self.scheduler.stats.chains_in_flight == 0
            if self._oldest is not None and (idle or time.monotonic() - self._oldest >= wait):
                await self._flush()  # old enough, or nothing else to wait for

    def _sample_occupancy(self) -> None:
        if self.scheduler is not None:
            st = self.scheduler.stats
            self._occupancy.append((round(time.time(), 3), st.in_flight, st.chains_in_flight,
                                    st.completion_tokens))

    async def _flush(self) -> None:
        async with self._flush_lock:
            if self._disk_full is not None:
                return  # the driver stops the run; a resume redoes the unwritten chains
            try:
                await self._write_finished()
            except Exception as exc:  # noqa: BLE001 - reported to the driver by poll
                if not is_no_space(exc):
                    log.exception("writing a shard failed")
                    self._error = f"writing a shard failed: {type(exc).__name__}: {exc}"
                else:
                    self._disk_full = f"{type(exc).__name__}: {exc}"
                self._news.set()

    async def _write_finished(self) -> None:
        self._sample_occupancy()  # the log then covers the run up to this shard, the last too
        samples, self._occupancy = self._occupancy, []
        if samples:
            await asyncio.to_thread(_append_occupancy, samples,
                                    self.run_dir / "logs" / f"occupancy-{self.index:03d}.jsonl")
        rows, self._buffer, self._oldest = self._buffer, [], None
        if not rows:
            return
        name = f"{shard_prefix(self.index)}{self.incarnation}-{self._seq:06d}.parquet"
        self._seq += 1
        info = await asyncio.to_thread(write_shard, rows, self.run_dir / "evolutions", name)
        self._written += len(rows)
        self._shards.append(info)
        self._news.set()


def _append_occupancy(samples: list[tuple[float, int, int, int]], path: Path) -> None:
    """Append (unix time, requests in flight, chains in flight, completion tokens so far)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for t, requests, chains, tokens in samples:
            fh.write(json.dumps({"t": t, "requests": requests, "chains": chains,
                                 "tokens": tokens}) + "\n")


def write_shard(rows: list[dict[str, Any]], folder: Path, name: str) -> dict[str, Any]:
    """Verify ``rows`` (EVOLUTIONS rows), write them atomically as ``folder/name`` and record
    the shard's SHA-256 beside it; returns the shard's name, seed ids, rows, rejected chains and
    tokens for the driver.

    A write that fails (a full disk) leaves nothing: the temporary file is removed, and so is
    the renamed shard when its hash cannot be recorded, so the rows are written again later.
    """
    for row in rows:
        annotate_levels(row)
    table = pa.Table.from_pylist(rows, schema=schema.EVOLUTIONS)
    folder.mkdir(parents=True, exist_ok=True)
    tmp, path = folder / f".{name}.tmp", folder / name
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # a half-written file never carries a shard's name
        mf.record_hash(path)  # after the rename: a shard without a hash is redone on resume
    except BaseException:
        tmp.unlink(missing_ok=True)
        mf.remove_shard(path)
        raise
    return {
        "name": name,
        "rows": len(rows),
        "seed_ids": [r["seed_id"] for r in rows],
        "stopped_early": sum(r["stop_reason"] != "completed" for r in rows),
        "completion_tokens": sum(lvl["completion_tokens"] or 0
                                 for r in rows for lvl in r["levels"]),
    }
