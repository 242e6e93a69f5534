"""The generation job: seeds -> Ray Data -> teacher actor pool (evolve + answer, k rounds)
-> ``evolutions/`` -> ``pairs/`` and ``rejects/`` Parquet shards + ``manifest.json``.

This is the one module that knows Ray. Evolution, pairing and engines are plain Python.

Stage contracts:

* ``ChainWorker`` (actor pool): needs ``schema.SEEDS`` columns; returns ``schema.EVOLUTIONS``.
* ``verify_batch`` (tasks): needs and returns ``schema.EVOLUTIONS``; adds each level's
  pass/fail against its requirements.
* ``pairs_batch`` / ``rejects_batch`` (tasks): need verified ``schema.EVOLUTIONS``; return
  ``schema.PAIRS`` (train and heldout splits) / ``schema.REJECTS``.

``evolutions/`` is the expensive stage's output and the run's source of truth: a run that
stops part-way resumes by skipping the seeds whose chains are already written, and ``pairs/``
and ``rejects/`` are always rebuilt from it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ecd_ray import schema
from ecd_ray.config import PairsConfig, RunConfig
from ecd_ray.engines import Sampling, build_engine
from ecd_ray.evolution import ChainRunner
from ecd_ray.pairs import build_pairs, is_heldout
from ecd_ray.pipeline import manifest as mf
from ecd_ray.seeds import read_seeds
from ecd_ray.verify import annotate_levels

log = logging.getLogger(__name__)

# Fractional CPUs for the light read/pair/write tasks, so they never wait behind actors
# that hold every CPU of a small node (a known Ray Data deadlock on small clusters).
LIGHT_TASK_CPUS = 0.25
STAGED_ROWS_PER_FILE = 10_000


class ChainWorker:
    """A Ray Data actor: holds one teacher engine and evolves + answers batches of seeds."""

    def __init__(self, cfg_json: str, scratch: str):
        cfg = RunConfig.model_validate_json(cfg_json)
        t = cfg.teacher
        engine = build_engine(t, seed=cfg.seed, scratch=Path(scratch))
        evolver = None
        if cfg.evolver is not None and cfg.evolution.mode == "teacher":
            evolver = build_engine(cfg.evolver, seed=cfg.seed, scratch=Path(scratch))
        answer = Sampling(temperature=t.temperature, top_p=t.top_p,
                          max_new_tokens=t.max_new_tokens, min_new_tokens=t.min_new_tokens)
        self.runner = ChainRunner(engine, cfg.evolution, rounds=cfg.rounds, seed=cfg.seed,
                                  answer=answer, system_prompt=t.system_prompt, evolver=evolver)
        import ray

        self.worker = f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        schema.missing_columns(batch, schema.SEEDS, "evolve+answer")
        start = time.perf_counter()
        rows = self.runner.run(batch.select(schema.SEEDS.names).to_pylist())
        for row in rows:
            row["worker"] = self.worker
        elapsed = time.perf_counter() - start
        tokens = sum(lvl["completion_tokens"] or 0 for r in rows for lvl in r["levels"])
        levels = sum(r["num_levels"] for r in rows)
        # Printed by the actor; Ray forwards it to the driver's console as progress.
        print(f"[ecd-ray] chains done: {len(rows)} seeds, {levels} answered levels, "
              f"{tokens} tokens in {elapsed:.1f} s ({tokens / max(elapsed, 1e-9):.0f} tok/s)",
              flush=True)
        return pa.Table.from_pylist(rows, schema=schema.EVOLUTIONS)


def verify_batch(batch: pa.Table) -> pa.Table:
    """The verify stage: every level's answer against every requirement in force there."""
    schema.missing_columns(batch, schema.EVOLUTIONS, "verify")
    rows = [annotate_levels(chain) for chain in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=schema.EVOLUTIONS)


def _chain_pairs(batch: pa.Table, pairs: PairsConfig, seed: int, stage: str
                 ) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    schema.missing_columns(batch, schema.EVOLUTIONS, stage)
    out = []
    for chain in batch.to_pylist():
        split = "heldout" if is_heldout(chain["seed_id"], pairs.holdout_fraction, seed) \
            else "train"
        out.append(build_pairs(chain, pairs.max_negative_gap, pairs.policy, split))
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
    """map_batches' resource arguments for the ChainWorker pool.

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


def pairs_batch(batch: pa.Table, pairs: PairsConfig, seed: int) -> pa.Table:
    """ECD pairs of a batch of verified chains, with their split."""
    rows = [p for kept, _ in _chain_pairs(batch, pairs, seed, "pair") for p in kept]
    return pa.Table.from_pylist(rows, schema=schema.PAIRS)


def rejects_batch(batch: pa.Table, pairs: PairsConfig, seed: int) -> pa.Table:
    """Rejects of a batch of chains: failed evolutions/answers, pairs the policy refused,
    identical answers, pairless seeds."""
    rows = [r for _, rejected in _chain_pairs(batch, pairs, seed, "rejects") for r in rejected]
    return pa.Table.from_pylist(rows, schema=schema.REJECTS)


# ---------------------------------------------------------------------------------------------


def _prepare_run_dir(cfg: RunConfig) -> bool:
    """Create or reuse the run folder; True when resuming a run that stopped part-way."""
    run_dir = cfg.run_dir
    if run_dir.exists() and cfg.overwrite:
        shutil.rmtree(run_dir)
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
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


def _write_table(rows: list[dict[str, Any]], sch: pa.Schema, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=sch), tmp)
    tmp.rename(path)  # a half-written file never carries the final name


def _stage_seeds(cfg: RunConfig, resume: bool) -> tuple[int, int, int]:
    """Validate seeds, write seed rejects and the not-yet-done seeds in batch-sized shards.

    Returns (rows read, valid seeds, seeds still to run).
    """
    run_dir = cfg.run_dir
    result = read_seeds(cfg.seeds)
    _write_table(result.rejects, schema.REJECTS, run_dir / "rejects" / "seeds.parquet")
    done = mf.done_seed_ids(run_dir / "evolutions") if resume else set()
    todo = [s for s in result.seeds if s["seed_id"] not in done]
    staged = run_dir / "staged_seeds"
    shutil.rmtree(staged, ignore_errors=True)
    for i in range(0, len(todo), STAGED_ROWS_PER_FILE):
        _write_table(todo[i : i + STAGED_ROWS_PER_FILE], schema.SEEDS,
                     staged / f"seeds-{i // STAGED_ROWS_PER_FILE:06d}.parquet")
    return result.rows_read, len(result.seeds), len(todo)


def _init_ray(cfg: RunConfig) -> bool:
    """Connect to Ray, or start a local one; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return True
    # Logical CPUs: at least enough for the actor pool plus headroom for read/write tasks.
    needed = int(cfg.teacher.replicas * cfg.teacher.num_cpus + 1)
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, needed)
    store = cfg.ray.object_store_memory_gib
    ray.init(
        address="local",  # never attach to another Ray instance on this machine
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=int(store * 2**30) if store else None,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    return True


def _run_chains(cfg: RunConfig, n_todo: int) -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    run_dir = cfg.run_dir.resolve()
    if n_todo == 0:
        return
    t = cfg.teacher
    # One block per actor batch: the pool's actors share the work batch by batch, each batch
    # is written as its own shard (the unit of resumption), and the same seeds form the same
    # batches in every run, which keeps batched sampling reproducible.
    # (repartition's tasks take 1 CPU each: a cluster needs one CPU beside the actor pool.)
    ds = ray.data.read_parquet(str(run_dir / "staged_seeds"), num_cpus=LIGHT_TASK_CPUS)
    ds = ds.repartition(math.ceil(n_todo / t.batch_size))
    ds = ds.map_batches(
        ChainWorker,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(),
                               "scratch": str(run_dir / "scratch")},
        batch_size=t.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=t.replicas),
        **actor_resources(cfg),
    )
    ds = ds.map_batches(verify_batch, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)
    ds.write_parquet(str(run_dir / "evolutions"), ray_remote_args={"num_cpus": LIGHT_TASK_CPUS})


def _derive_pairs_and_rejects(cfg: RunConfig) -> None:
    import ray

    run_dir = cfg.run_dir.resolve()
    for target in (run_dir / "pairs", run_dir / "heldout", run_dir / "rejects" / "chains"):
        shutil.rmtree(target, ignore_errors=True)
    args = {"pairs": cfg.pairs, "seed": cfg.seed}
    write_args = {"ray_remote_args": {"num_cpus": LIGHT_TASK_CPUS}}
    evolutions = ray.data.read_parquet(str(run_dir / "evolutions"), num_cpus=LIGHT_TASK_CPUS)
    pairs = evolutions.map_batches(
        pairs_batch, fn_kwargs=args, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS
    ).materialize()
    for split, folder in (("train", "pairs"), ("heldout", "heldout")):
        pairs.filter(expr=f"split == '{split}'").write_parquet(str(run_dir / folder),
                                                               **write_args)
    evolutions.map_batches(
        rejects_batch, fn_kwargs=args, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS
    ).write_parquet(str(run_dir / "rejects" / "chains"), **write_args)


def generate(cfg: RunConfig) -> dict[str, Any]:
    """Run the whole generation job for ``cfg``; returns the manifest it writes."""
    started = time.time()
    resume = _prepare_run_dir(cfg)
    mf.write(cfg, status="running", extra={"started": started})
    rows_read, n_valid, n_todo = _stage_seeds(cfg, resume)
    log.info("seeds: %d rows read, %d valid, %d to run%s", rows_read, n_valid, n_todo,
             " (resuming)" if resume else "")
    started_ray = _init_ray(cfg)
    try:
        _run_chains(cfg, n_todo)
        _derive_pairs_and_rejects(cfg)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    shutil.rmtree(cfg.run_dir / "staged_seeds", ignore_errors=True)
    manifest = mf.finish(cfg, rows_read=rows_read, n_valid=n_valid, started=started)
    return manifest


__all__ = ["ChainWorker", "generate", "pairs_batch", "rejects_batch", "verify_batch"]
