"""The generation job: seeds -> chain actors (teacher engines, continuous chains) ->
``evolutions/`` shards -> Ray Data -> ``pairs/``, ``heldout/``, ``rejects/`` + ``manifest.json``.

This is the one module (with :mod:`ecd_ray.pipeline.chain_actor`) that knows Ray. The driver
streams validated seeds to a pool of async Ray actors, each holding one teacher engine and
many chains in flight (:mod:`ecd_ray.scheduler`). Actors write finished chains as atomic
shards; the driver keeps only the work in flight (plus a compact set of done seed ids), so its
memory does not grow with the seed file.

Faults: an actor that dies (killed, out of memory, engine dead) is restarted by Ray; the
driver finds the shards it wrote but never reported, and re-submits only its unwritten seeds,
so no seed is lost or written twice. A stopped run (Ctrl-C, SIGKILL of the driver) resumes
with the same command: seeds whose chains are on disk are skipped.

Stage contracts:

* ``ChainActor``: takes ``schema.SEEDS`` rows; writes verified ``schema.EVOLUTIONS`` shards.
* ``pairs_batch`` / ``rejects_batch`` (Ray Data tasks): need verified ``schema.EVOLUTIONS``;
  return ``schema.PAIRS`` (train and heldout splits) / ``schema.REJECTS``.

``evolutions/`` is the expensive stage's output and the run's source of truth; ``pairs/`` and
``rejects/chains/`` are always rebuilt from it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ecd_ray import runlock, schema
from ecd_ray.config import RunConfig
from ecd_ray.pairs import build_pairs, is_heldout
from ecd_ray.pipeline import manifest as mf
from ecd_ray.pipeline.chain_actor import ChainActor, is_no_space, shard_prefix
from ecd_ray.pipeline.progress import Progress
from ecd_ray.ray_setup import local_ray_on_loopback, read_parquet
from ecd_ray.seeds import iter_seeds
from ecd_ray.verify import annotate_levels

log = logging.getLogger(__name__)

# Fractional CPUs for the light read/pair/write tasks, so they never wait behind actors
# that hold every CPU of a small node (a known Ray Data deadlock on small clusters).
LIGHT_TASK_CPUS = 0.25
REJECT_ROWS_PER_FILE = 10_000
SUBMIT_UNIT = 32  # seeds per submit call


class RunInterrupted(Exception):  # noqa: N818 - a stop the user asked for, not a failure
    """The user stopped the run (Ctrl-C); it is resumable with the same command."""

    def __init__(self, done: int, total: int, run_dir: Path):
        self.done, self.total, self.run_dir = done, total, run_dir
        super().__init__(f"stopped with {done} of {total} seeds written to {run_dir}")


class DiskFull(RuntimeError):
    """A write into the run folder found no space left (ENOSPC, or a full quota). The run
    stopped with every shard on disk whole (or absent); it resumes with the same command once
    there is space."""

    def __init__(self, run_dir: Path, cause: str):
        self.run_dir = run_dir
        super().__init__(
            f"no space left on the device of {run_dir} ({cause}); the run stopped and is "
            f"resumable: free some space (df -h {run_dir}), then run the same command again "
            "(every chain already written is kept)")


def verify_batch(batch: pa.Table) -> pa.Table:
    """The verify stage: every level's answer against every requirement in force there."""
    schema.missing_columns(batch, schema.EVOLUTIONS, "verify")
    rows = [annotate_levels(chain) for chain in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=schema.EVOLUTIONS)


def _chain_pairs(batch: pa.Table, cfg: RunConfig, stage: str,
                 ) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    schema.missing_columns(batch, schema.EVOLUTIONS, stage)
    pairs = cfg.pairs
    teacher = next(({"name": r.name, "rank": r.rank} for r in cfg.responders()
                    if r.from_teacher), None)
    out = []
    for chain in batch.to_pylist():
        split = "heldout" if is_heldout(chain["seed_id"], pairs.holdout_fraction, cfg.seed) \
            else "train"
        out.append(build_pairs(
            chain, pairs.max_negative_gap, pairs.policy, split, cfg.teacher.system_prompt,
            truncated_chosen=pairs.truncated_chosen, teacher=teacher,
            rank_pairs_how=cfg.apc.rank_pairs, apc_filter=cfg.apc.filter,
            stage_edges=pairs.stage_edges))
    return out


def replica_bundles(cfg: RunConfig) -> list[dict[str, float]] | None:
    """Placement-group bundles of one actor whose vLLM engine spans several GPUs (tensor x
    pipeline parallel): one ``{GPU: 1, CPU: 1}`` bundle per GPU; None for a single-GPU or CPU
    engine, which the actor reserves directly."""
    t = cfg.teacher
    gpus = t.vllm.tensor_parallel_size * t.vllm.pipeline_parallel_size
    if t.engine not in ("vllm", "auto") or t.num_gpus == 0 or gpus == 1:
        return None
    return [{"GPU": 1.0, "CPU": 1.0} for _ in range(gpus)]


def actor_resources(cfg: RunConfig) -> dict[str, Any]:
    """Resource arguments of one chain actor (``ray.remote(...).options(**...)``).

    A multi-GPU replica is scheduled into a fresh placement group per actor (STRICT_PACK: the
    GPUs of one tensor-parallel engine share a node; PACK when pipeline parallelism may span
    nodes); the actor itself takes no GPU and vLLM's Ray workers take the bundles, as
    ``ray.data.llm`` does. Otherwise the actor reserves ``num_gpus`` directly.
    """
    t = cfg.teacher
    bundles = replica_bundles(cfg)
    if bundles is None:
        return {"num_cpus": t.num_cpus, "num_gpus": t.num_gpus or None}
    strategy = "PACK" if t.vllm.pipeline_parallel_size > 1 else "STRICT_PACK"

    def placement() -> dict[str, Any]:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = placement_group(bundles, strategy=strategy)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            pg, placement_group_capture_child_tasks=True)}

    return {"num_cpus": LIGHT_TASK_CPUS, "num_gpus": None, "ray_remote_args_fn": placement}


def pairs_batch(batch: pa.Table, cfg: RunConfig) -> pa.Table:
    """ECD and APC pairs of a batch of verified chains, with their split; each pair's prompt
    is the conversation its answers were generated from (the system prompt included)."""
    rows = [p for kept, _ in _chain_pairs(batch, cfg, "pair") for p in kept]
    return pa.Table.from_pylist(rows, schema=schema.PAIRS)


def rejects_batch(batch: pa.Table, cfg: RunConfig) -> pa.Table:
    """Rejects of a batch of chains: failed evolutions/answers/responses, pairs refused (pair
    policy, truncated chosen side, APC filter, identical answers), pairless seeds."""
    rows = [r for _, rejected in _chain_pairs(batch, cfg, "rejects") for r in rejected]
    return pa.Table.from_pylist(rows, schema=schema.REJECTS)


# ---------------------------------------------------------------------------------------------


def _init_ray(cfg: RunConfig, verbose: bool) -> bool:
    """Connect to Ray, or start a local one; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.ERROR)
        return True
    # Logical CPUs: at least enough for the actor pool plus headroom for read/write tasks.
    needed = int(cfg.teacher.replicas * cfg.teacher.num_cpus + 1)
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, needed)
    store = cfg.ray.object_store_memory_gib
    with local_ray_on_loopback():  # its servers listen on 127.0.0.1 only
        ray.init(
            address="local",  # never attach to another Ray instance on this machine
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=int(store * 2**30) if store else None,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.ERROR,
        )
    return True


def _derive_pairs_and_rejects(cfg: RunConfig, verbose: bool) -> None:
    """pairs/, heldout/ and rejects/chains/ from evolutions/ (a Ray Data pipeline)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.ERROR)

    run_dir = cfg.run_dir.resolve()
    for target in (run_dir / "pairs", run_dir / "heldout", run_dir / "rejects" / "chains"):
        shutil.rmtree(target, ignore_errors=True)
    args = {"cfg": cfg}
    write_args = {"ray_remote_args": {"num_cpus": LIGHT_TASK_CPUS}}
    # Only *.parquet files: the hash and temporary files beside the shards are not data.
    evolutions = read_parquet(str(run_dir / "evolutions"), num_cpus=LIGHT_TASK_CPUS,
                              file_extensions=["parquet"])
    pairs = evolutions.map_batches(
        pairs_batch, fn_kwargs=args, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS
    ).materialize()
    for split, folder in (("train", "pairs"), ("heldout", "heldout")):
        pairs.filter(expr=f"split == '{split}'").write_parquet(str(run_dir / folder),
                                                               **write_args)
    evolutions.map_batches(
        rejects_batch, fn_kwargs=args, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS
    ).write_parquet(str(run_dir / "rejects" / "chains"), **write_args)




# ---------------------------------------------------------------------------------------------
# Run folder, logs, seeds


def _prepare_run_dir(cfg: RunConfig) -> bool:
    """Reuse (or empty, with ``overwrite``) the run folder, which this process has locked;
    True when resuming a run that stopped part-way."""
    run_dir = cfg.run_dir
    if cfg.overwrite:
        runlock.clear_run_dir(run_dir)  # everything but the lock this process holds
    if runlock.is_empty_but_lock(run_dir):
        return False
    old = mf.read(run_dir)
    if old is None:
        raise FileExistsError(
            f"{run_dir} exists but holds no manifest.json; choose another run_name or set "
            "overwrite=true"
        )
    if old.get("status") == "complete":
        raise FileExistsError(
            f"{run_dir} already holds a complete run; set overwrite=true to redo it or choose "
            "another run_name"
        )
    if old.get("config_hash") != mf.config_hash(cfg):
        raise FileExistsError(
            f"{run_dir} holds an unfinished run with a different config; set overwrite=true "
            "or use the same config to resume it"
        )
    return True


class _RunLog(logging.FileHandler):
    """The run's log file. A record that finds the disk full is dropped without the traceback
    ``logging`` would print for it: the console still shows the warnings and the final error."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if not is_no_space(sys.exc_info()[1] or Exception()):
            super().handleError(record)


def _log_to_file(run_dir: Path) -> logging.Handler:
    """Everything at INFO and above also goes to ``<run>/logs/generate.log``."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = _RunLog(run_dir / "logs" / "generate.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return handler


ACTORS_FILE = "actors.json"  # the chain actors' pids, so a resumed run can wait for them


def _record_actor(run_dir: Path, info: dict[str, Any]) -> None:
    """Remember an actor process (this host's pid) that writes into ``run_dir``."""
    path = run_dir / ACTORS_FILE
    known = json.loads(path.read_text()) if path.is_file() else []
    known.append({"host": socket.gethostname(), "pid": info["pid"]})
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(known))
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: the old list stays whole
        raise
    os.replace(tmp, path)


def _is_chain_actor(pid: int) -> bool:
    try:
        return b"ChainActor" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_for_old_actors(run_dir: Path, timeout_s: float = 60.0) -> None:
    """A run killed with its driver can leave chain actors that still flush a shard for a few
    seconds; resuming before they are gone would write those seeds twice. Wait for them."""
    path = run_dir / ACTORS_FILE
    if not path.is_file():
        return
    host = socket.gethostname()
    pids = [a["pid"] for a in json.loads(path.read_text()) if a.get("host") == host]
    deadline = time.monotonic() + timeout_s
    if alive := [p for p in pids if _is_chain_actor(p)]:
        log.warning("waiting for chain actor(s) %s of the earlier run to exit", alive)
    while (alive := [p for p in pids if _is_chain_actor(p)]):
        if time.monotonic() > deadline:
            raise FileExistsError(
                f"chain actor process(es) {alive} of an earlier run still write into {run_dir};"
                " wait for them to exit (or stop them by pid), then run the same command again")
        time.sleep(0.5)
    path.unlink()


def _write_table(rows: list[dict[str, Any]], sch: pa.Schema, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=sch), tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)  # a half-written file never carries the final name


def _write_seed_rejects(cfg: RunConfig) -> tuple[int, int]:
    """Stream the seeds once: write every seed reject (in chunks), count rows and valid seeds.
    Returns (rows read, valid seeds)."""
    folder = cfg.run_dir / "rejects" / "seeds"
    shutil.rmtree(folder, ignore_errors=True)
    rows = valid = part = 0
    chunk: list[dict[str, Any]] = []
    for seed, bad in iter_seeds(cfg.seeds):
        rows += 1
        if seed is not None:
            valid += 1
            continue
        chunk.append(bad)
        if len(chunk) == REJECT_ROWS_PER_FILE:
            _write_table(chunk, schema.REJECTS, folder / f"part-{part:06d}.parquet")
            chunk, part = [], part + 1
    if chunk or part == 0:
        _write_table(chunk, schema.REJECTS, folder / f"part-{part:06d}.parquet")
    return rows, valid


def _todo_seeds(cfg: RunConfig, done: Any) -> Iterator[dict[str, Any]]:
    """The valid seeds whose chains are not on disk, streamed in input order."""
    for seed, _ in iter_seeds(cfg.seeds):
        if seed is not None and seed["seed_id"] not in done:
            yield seed


# ---------------------------------------------------------------------------------------------
# The chain actors


@dataclass
class _Actor:
    """The driver's view of one chain actor: what it was given and has not yet written."""

    index: int
    handle: Any
    info: dict[str, Any] = field(default_factory=dict)
    outstanding: dict[str, dict[str, Any]] = field(default_factory=dict)
    poll: Any = None
    ended: bool = False
    submitted: int = 0  # seeds submitted to the current incarnation
    restarts: int = 0
    tokens_base: int = 0  # completion tokens of earlier incarnations
    tokens: int = 0


class _Pool:
    """Feeds seeds to the chain actors, collects their shards, recovers dead actors."""

    def __init__(self, cfg: RunConfig, seeds: Iterator[dict[str, Any]], todo: int,
                 progress: Progress, verbose: bool):
        import ray

        self.cfg = cfg
        self.todo = todo
        self.run_dir = cfg.run_dir.resolve()
        self.seeds = seeds
        self.retry: deque[dict[str, Any]] = deque()
        self.exhausted = False
        self.progress = progress
        self.reported: set[str] = set()  # shard names (one per flush: few)
        self.stopped = False
        args = actor_resources(cfg)
        remote_fn = args.pop("ray_remote_args_fn", None)
        opts = {k: v for k, v in args.items() if v is not None}
        cls = ray.remote(ChainActor)
        self.actors = []
        for i in range(cfg.teacher.replicas):
            extra = remote_fn() if remote_fn else {}
            handle = cls.options(**opts, **extra, max_restarts=cfg.scheduler.max_actor_restarts,
                                 max_task_retries=0, max_concurrency=1000).remote(
                cfg.model_dump_json(), str(self.run_dir), i, verbose)
            self.actors.append(_Actor(i, handle))

    # -- start, feed, poll ----------------------------------------------------------------

    def start(self) -> None:
        import ray

        refs = [a.handle.start.remote() for a in self.actors]
        infos = ray.get(refs, timeout=self.cfg.scheduler.engine_start_timeout_s)
        for actor, info in zip(self.actors, infos, strict=True):
            actor.info = info
            _record_actor(self.run_dir, info)
            actor.poll = actor.handle.poll.remote()
            log.info("chain actor %d ready: %s", actor.index, info)

    def _take(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n and self.retry:
            out.append(self.retry.popleft())
        while len(out) < n and not self.exhausted:
            seed = next(self.seeds, None)
            if seed is None:
                self.exhausted = True
            else:
                out.append(seed)
        return out

    def feed(self) -> None:
        """Top every actor up to its chains in flight, a shard's worth of finished chains and
        one unit queued, a unit at a time in turn, so a small run still spreads over every
        actor. An actor whose input was ended gets no more seeds: it stops taking seeds once
        it has the count ``end_input`` gave it, so a dead actor's seeds queued again after
        that would never run there; they go to the restarted actor instead."""
        unit = max(1, min(SUBMIT_UNIT, -(-self.todo // len(self.actors))))
        progress = True
        while progress:
            progress = False
            for actor in self.actors:
                if actor.ended:
                    continue
                # chains in flight + a full shard's worth finished and waiting for its flush
                # + one unit queued: the actor never idles waiting for a flush.
                target = actor.info["max_chains"] + self.cfg.scheduler.flush_rows + unit
                if len(actor.outstanding) >= target:
                    continue
                batch = self._take(min(unit, target - len(actor.outstanding)))
                if not batch:
                    break
                actor.outstanding.update((s["seed_id"], s) for s in batch)
                actor.submitted += len(batch)
                actor.handle.submit.remote(batch)
                progress = True
        if self.exhausted and not self.retry:
            for actor in self.actors:
                if not actor.ended:
                    actor.handle.end_input.remote(actor.submitted)
                    actor.ended = True

    @property
    def finished(self) -> bool:
        return self.exhausted and not self.retry and not any(a.outstanding for a in self.actors)

    def step(self, timeout_s: float = 1.0) -> None:
        """Wait for one actor's report (or the timeout) and apply it."""
        import ray

        by_ref = {a.poll: a for a in self.actors}
        ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=timeout_s)
        for ref in ready:
            actor = by_ref[ref]
            try:
                report = ray.get(ref)
            except ray.exceptions.ActorUnavailableError:
                actor.poll = actor.handle.poll.remote()  # reachable again soon, or dead later
                continue
            except ray.exceptions.RayError as exc:
                self._recover(actor, exc)
                continue
            if report["incarnation"] != actor.info["incarnation"]:
                # Ray restarted the actor (a call in flight may report that only as
                # "unavailable"): this process has not seen our seeds.
                self._recover(actor, RuntimeError(f"actor restarted (incarnation "
                                                  f"{report['incarnation']})"))
                continue
            self._apply(actor, report)
            actor.poll = actor.handle.poll.remote()

    def _apply(self, actor: _Actor, report: dict[str, Any]) -> None:
        for shard in report["shards"]:
            self._written(actor, shard["name"], shard["seed_ids"], shard["stopped_early"])
        if report.get("disk_full"):
            raise DiskFull(self.run_dir, f"chain actor {actor.index} writing a shard: "
                                         f"{report['disk_full']}")
        actor.tokens = actor.tokens_base + report["completion_tokens"]
        self.progress.update(in_flight=sum(len(a.outstanding) for a in self.actors),
                             tokens=sum(a.tokens for a in self.actors))

    def _written(self, actor: _Actor, name: str, seed_ids: list[str], stopped: int) -> None:
        self.reported.add(name)
        for sid in seed_ids:
            actor.outstanding.pop(sid, None)
        self.progress.add_done(len(seed_ids), stopped)

    # -- faults ---------------------------------------------------------------------------

    def _recover(self, actor: _Actor, exc: Exception) -> None:
        """An actor died or its scheduler failed: wait for Ray's restart, account for the
        shards it wrote but never reported, and queue its unwritten seeds again."""
        import ray

        actor.restarts += 1
        self.progress.restarts += 1
        cause = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        log.warning("chain actor %d failed (%s); restart %d", actor.index, cause,
                    actor.restarts)
        if actor.restarts > self.cfg.scheduler.max_actor_restarts:
            raise RuntimeError(
                f"chain actor {actor.index} failed {actor.restarts} times (the limit is "
                f"scheduler.max_actor_restarts={self.cfg.scheduler.max_actor_restarts}); last "
                f"cause: {cause}. The run is resumable: fix the cause and run the same command")
        if isinstance(exc, ray.exceptions.RayTaskError):
            ray.kill(actor.handle, no_restart=False)  # the engine failed: a fresh process
        # The new incarnation answering proves the old process is gone. A call sent while Ray
        # restarts the actor can fail as "unavailable": send it again (start is idempotent).
        # A start answered by the old incarnation (the kill not yet landed) is sent again.
        failed_at = time.monotonic()
        deadline = failed_at + self.cfg.scheduler.engine_start_timeout_s
        old = actor.info.get("incarnation")
        died: float | None = None
        while True:
            try:
                info = ray.get(actor.handle.start.remote(),
                               timeout=max(1.0, deadline - time.monotonic()))
                if info["incarnation"] != old:
                    actor.info = info
                    _record_actor(self.run_dir, info)
                    break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                pass  # a restart still waiting for a node with room ends at the deadline below
            except ray.exceptions.RayActorError as again:
                # The call reached the dying process; a restarted one answers within seconds,
                # a dead-for-good one never does.
                died = died or time.monotonic()
                if time.monotonic() - died > 60:
                    raise RuntimeError(f"chain actor {actor.index} could not be restarted: "
                                       f"{str(again).splitlines()[0][:300]}") from again
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"chain actor {actor.index} did not come back within scheduler."
                    f"engine_start_timeout_s={self.cfg.scheduler.engine_start_timeout_s:g}; if "
                    "its node was lost, no remaining node may have room for it (ray status "
                    "shows the pending demand): add a node, or lower teacher.num_cpus / "
                    "teacher.num_gpus. The run is resumable with the same command")
            time.sleep(1.0)
        recovered = 0
        prefix = shard_prefix(actor.index)
        for path in sorted((self.run_dir / "evolutions").glob(f"{prefix}*.parquet")):
            if path.name not in self.reported:
                if (problem := mf.shard_problem(path)) is not None:
                    # The dead process stopped mid-write: its seeds are queued again below.
                    log.warning("removing %s: %s; its chains will be redone", path, problem)
                    mf.remove_shard(path)
                    continue
                ids = pq.read_table(path, columns=["seed_id"])["seed_id"].to_pylist()
                stopped = 0  # not known without reading levels; only the progress line uses it
                self._written(actor, path.name, ids, stopped)
                recovered += 1
        log.info("chain actor %d back after %.1f s on %s: %d unreported shard(s) recovered, "
                 "%d seed(s) queued again", actor.index, time.monotonic() - failed_at,
                 info["worker"], recovered, len(actor.outstanding))
        self.retry.extendleft(reversed(list(actor.outstanding.values())))
        actor.outstanding = {}
        actor.ended = False
        actor.submitted = 0
        actor.tokens_base = actor.tokens
        actor.poll = actor.handle.poll.remote()

    # -- stop -------------------------------------------------------------------------------

    def stop(self, flush: bool, timeout_s: float = 5.0) -> None:
        """Flush what is finished (on a user stop), then end every actor (once)."""
        import ray

        if self.stopped:
            return
        self.stopped = True
        if flush:
            refs = [a.handle.flush.remote() for a in self.actors]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a stop must not fail on a dying actor
                log.warning("flush before stop failed", exc_info=True)
        else:
            refs = [a.handle.close.remote() for a in self.actors]
            ray.wait(refs, num_returns=len(refs), timeout=60)
        for a in self.actors:
            try:
                ray.kill(a.handle, no_restart=True)
            except Exception:  # noqa: BLE001
                log.warning("could not kill chain actor %d", a.index, exc_info=True)


def _run_chains(cfg: RunConfig, pool: _Pool) -> dict[str, float]:
    """Run every seed's chain; returns the timings the manifest records."""
    t0 = time.time()
    pool.start()
    ready = time.time()
    pool.progress.engines_ready()
    while True:
        pool.feed()
        if pool.finished:
            break
        pool.step()
    return {"engine_start_s": round(ready - t0, 1), "chains_s": round(time.time() - ready, 1),
            "chains_started": ready, "chains_ended": time.time()}


def _record_failure(cfg: RunConfig, started: float, exc: Exception) -> None:
    """Mark the manifest ``failed`` with the cause, if there is room to write it (on a full
    disk there may be none: the manifest then stays ``running``, which resumes the same)."""
    try:
        mf.write(cfg, status="failed", extra={"started": started, "error": str(exc)[:500]})
    except OSError:
        log.warning("could not record the failure in the manifest", exc_info=True)


def resume_command() -> str:
    """The command line that started this process, to resume it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("ecd-ray", "cli.py")):
        argv[0] = "ecd-ray"
    return " ".join(shlex.quote(a) for a in argv)


def generate(cfg: RunConfig, *, verbose: bool = False) -> dict[str, Any]:
    """Run the whole generation job for ``cfg``; returns the manifest it writes.

    The run folder's lock (:mod:`ecd_ray.runlock`) is held throughout: a second run on the
    folder is refused with :class:`~ecd_ray.runlock.RunLocked`, before anything is changed.
    Raises :class:`RunInterrupted` on Ctrl-C and :class:`DiskFull` when a write finds no space
    (the run is then resumable with the same command).
    """
    with runlock.hold(cfg.run_dir, command=resume_command()):
        try:
            return _generate(cfg, verbose)
        except DiskFull:
            raise
        except Exception as exc:
            if not is_no_space(exc):
                raise
            cause = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise DiskFull(cfg.run_dir, cause) from exc


def _generate(cfg: RunConfig, verbose: bool) -> dict[str, Any]:
    started = time.time()
    resume = _prepare_run_dir(cfg)
    handler = _log_to_file(cfg.run_dir)
    pool = None
    started_ray = False
    rows_read = n_valid = 0
    timings: dict[str, float] = {}
    try:
        mf.write(cfg, status="running", extra={"started": started})
        if resume:
            _wait_for_old_actors(cfg.run_dir)
        rows_read, n_valid = _write_seed_rejects(cfg)
        done = mf.done_seed_ids(cfg.run_dir / "evolutions") if resume else set()
        already = len(done)
        log.info("seeds: %d rows read, %d valid, %d already written%s", rows_read, n_valid,
                 already, " (resuming)" if resume else "")
        progress = Progress(total=n_valid, done=already, seed_rejects=rows_read - n_valid)
        started_ray = _init_ray(cfg, verbose)
        if already < n_valid:
            pool = _Pool(cfg, _todo_seeds(cfg, done), n_valid - already, progress, verbose)
            del done  # the pool needs only the seeds still to do
            timings = _run_chains(cfg, pool)
            pool.stop(flush=False)
        progress.close()
        t0 = time.time()
        _derive_pairs_and_rejects(cfg, verbose)
        timings["derive_s"] = round(time.time() - t0, 1)
    except KeyboardInterrupt:
        if pool is not None:
            pool.stop(flush=True)
        n = pool.progress.done if pool is not None else 0
        mf.write(cfg, status="interrupted", extra={"started": started})
        raise RunInterrupted(n, n_valid, cfg.run_dir) from None
    except Exception as exc:
        if pool is not None:
            pool.stop(flush=False)  # no actor writes on after the run has failed
        if isinstance(exc, DiskFull) or is_no_space(exc):
            _record_failure(cfg, started, exc)
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        logging.getLogger().removeHandler(handler)
    for tmp in (cfg.run_dir / "evolutions").glob(".*.tmp"):
        tmp.unlink()  # left by an actor killed mid-write
    restarts = sum(a.restarts for a in pool.actors) if pool else 0
    engines = [a.info for a in pool.actors] if pool else []
    from ecd_ray.hardware import cpu_info, has_native_bf16

    cpu = cpu_info()
    return mf.finish(cfg, rows_read=rows_read, n_valid=n_valid, started=started, extra={
        "actor_restarts": restarts,
        "timings": timings,
        "tokens_this_session": pool.progress.tokens if pool else 0,
        "engines": engines,
        "cpu": {"model": cpu["model"], "native_bf16": has_native_bf16(cpu["flags"]),
                "bf16_flags": [f for f in ("avx512_bf16", "amx_bf16") if f in cpu["flags"]],
                "avx2": "avx2" in cpu["flags"], "avx512f": "avx512f" in cpu["flags"]},
    })


__all__ = ["ChainActor", "RunInterrupted", "generate", "pairs_batch", "rejects_batch",
           "verify_batch"]
