"""``ecd-ray train``: preference training on Ray Train (the one training module that knows Ray).

The driver reads the pairs with ``ray.data.read_parquet`` (after the reference stage has added
reference log-probs), and a ``TorchTrainer`` streams each worker its shard
(``datasets=`` + ``get_dataset_shard``). Each worker wraps the policy in DeepSpeed ZeRO (or
DDP), buckets pairs by length into micro-batches, and reports metrics every optimiser step and
a checkpoint every ``checkpoint_every`` steps. A restarted or resumed run loads the last
checkpoint and skips the micro-batches it had consumed; a resume whose config would change the
data order or the step schedule is refused first (:data:`RESUME_KEY_FIELDS`). At the end the
(ZeRO-3 sharded) model is gathered into an HF folder, ``<run>/model``, that transformers and
vLLM load.

With ``curriculum=true`` every worker trains on the pairs' ``stage`` from easy (0) to hard:
see :func:`curriculum_datasets` for how that holds on each worker, not only globally.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from ecd_ray import runlock
from ecd_ray.config import TrainConfig
from ecd_ray.ray_setup import local_ray_on_loopback, read_parquet
from ecd_ray.train.collate import (
    CollateConfig,
    bucket_batches,
    collate,
    concatenated_logprobs,
    pad_token_id,
    stage_batches,
    tokenize_table_rows,
)
from ecd_ray.train.losses import LossOutput, reward_metrics
from ecd_ray.train.reference import (
    REF_COLUMNS,
    key_differences,
    model_identity,
    pairs_identity,
    reference_key,
    show_value,
)

log = logging.getLogger(__name__)

# Test hook: ``N`` raises in rank 0 once, after optimizer step N and before its checkpoint;
# ``N:kill`` SIGKILLs rank 0's process once, in the middle of step N (after its first
# micro-batch's backward), as a lost worker would die.
FAIL_AT_STEP_ENV = "ECD_RAY_FAIL_AT_STEP"
# "0" turns off the CPU workers' malloc_trim after every micro-batch (see _heap_trimmer)
MALLOC_TRIM_ENV = "ECD_RAY_MALLOC_TRIM"
STAGE_COLUMN = "stage"  # the curriculum stage of a pair (ecd_ray.curriculum), 0 = easiest


def collate_config(cfg: TrainConfig) -> CollateConfig:
    return CollateConfig(max_prompt_tokens=cfg.max_prompt_tokens, max_length=cfg.max_length,
                         truncation=cfg.truncation)


def _chunk_seed(seed: int, epoch: int, chunk: int, stage: int | None = None) -> int:
    key = f"{seed}:{epoch}:{chunk}" + ("" if stage is None else f":{stage}")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch as the training loop consumes it."""

    tensors: dict[str, torch.Tensor]  # collate() output
    ref: tuple[torch.Tensor, torch.Tensor] | None  # precomputed reference log-probs
    pair_ids: list[str | None]
    stage: int | None  # its curriculum stage; None when the curriculum is off


def _chunk_order(table: Any, lengths: list[int], cfg: TrainConfig, epoch: int, chunk: int,
                 stage: int | None) -> list[list[int]]:
    if stage is None:
        return bucket_batches(lengths, cfg.micro_batch_size, window=cfg.bucket_window,
                              seed=_chunk_seed(cfg.seed, epoch, chunk))
    stages = table.column(STAGE_COLUMN).to_pylist()
    if any(s != stage for s in stages):  # the driver's per-stage filter is broken
        raise RuntimeError(f"the stage-{stage} shard holds stages {sorted(set(stages))}")
    return stage_batches(stages, lengths, cfg.micro_batch_size, window=cfg.bucket_window,
                         seed=_chunk_seed(cfg.seed, epoch, chunk, stage))


def _column(rows: list[dict[str, Any]], idx: list[int], name: str) -> torch.Tensor:
    return torch.tensor([rows[i][name] for i in idx], dtype=torch.float64)


def micro_batches(shards: Sequence[tuple[int | None, Any]], cfg: TrainConfig, tokenizer: Any,
                  epoch: int, limit: int, layout: str = "padded") -> Iterator[MicroBatch]:
    """The first ``limit`` length-bucketed micro-batches of this worker's shards for ``epoch``,
    in a deterministic order, with their precomputed reference log-probs (if any), collated
    in ``layout`` (a resolved one: ``shared_prompt`` or ``padded``).

    ``shards`` is ``[(None, shard)]`` without a curriculum, else one ``(stage, shard)`` per
    stage, easiest first: each shard is read to its end before the next one starts."""
    n = 0
    span = cfg.bucket_window * cfg.micro_batch_size
    pad = pad_token_id(tokenizer)
    for stage, shard in shards:
        for chunk, table in enumerate(shard.iter_batches(batch_size=span,
                                                         batch_format="pyarrow")):
            rows = table.to_pylist()
            pairs = tokenize_table_rows(tokenizer, rows, collate_config(cfg))
            lengths = [p.row_length(layout) for p in pairs]
            for idx in _chunk_order(table, lengths, cfg, epoch, chunk, stage):
                if n >= limit:
                    return
                ref = None
                if cfg.reference == "precomputed":
                    ref = (_column(rows, idx, REF_COLUMNS[0]), _column(rows, idx, REF_COLUMNS[1]))
                yield MicroBatch(collate([pairs[i] for i in idx], pad, layout), ref,
                                 [rows[i].get("pair_id") for i in idx], stage)
                n += 1


def _heap_trimmer() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS).

    CPU workers call it after every micro-batch: glibc keeps the freed activation buffers of
    a step in its arenas, so the next step's peak comes on top. Set ``ECD_RAY_MALLOC_TRIM=0``
    (in the environment of the process that starts Ray) to turn it off: None then too."""
    import ctypes
    import ctypes.util

    if os.environ.get(MALLOC_TRIM_ENV) == "0":
        return None

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _reduce(values: dict[str, float], world: int) -> dict[str, float]:
    """Mean of each metric over the workers (max for memory)."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    mx = torch.tensor([values.get("peak_rss_gib", 0.0)], dtype=torch.float64)
    dist.all_reduce(t)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    out = {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}
    out["tokens"] = out["tokens"] * world  # a sum, not a mean
    out["peak_rss_gib"] = float(mx.item())
    return out


def _step_metrics(outs: list[LossOutput], tokens: int, started: float, world: int
                  ) -> dict[str, float]:
    merged = LossOutput(torch.cat([o.losses.detach() for o in outs]),
                        torch.cat([o.chosen_rewards for o in outs]),
                        torch.cat([o.rejected_rewards for o in outs]))
    values = {k: float(v) for k, v in reward_metrics(merged).items()}
    values["tokens"] = float(tokens)
    values["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    values = _reduce(values, world)
    elapsed = time.perf_counter() - started
    values["step_time_s"] = elapsed
    values["tokens_per_s"] = values["tokens"] / max(elapsed, 1e-9)
    return values


class _Logger:
    """metrics.jsonl (+ TensorBoard when enabled and installed) on rank 0."""

    def __init__(self, run_dir: Path, rank: int, tensorboard: bool):
        self.file = (run_dir / "metrics.jsonl").open("a") if rank == 0 else None
        self.tb = None
        if rank == 0 and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("[ecd-ray] tensorboard=true but tensorboard is not installed; skipping")

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        print("[ecd-ray] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in record.items()), flush=True)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, float):
                    self.tb.add_scalar(k, v, record["step"])


def _restore(policy: Any, config: dict[str, Any]) -> dict[str, Any]:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None and (problem := checkpoint_problem(Path(ckpt.path))) is not None:
        # Ray Train's latest report was damaged after it was registered: take the newest
        # whole one on disk (the driver checked config["resume_from"] the same way)
        log.warning("not restoring %s: %s", ckpt.path, problem)
        ckpt = None
        fallback = latest_checkpoint(Path(config["run_dir"]))
        if fallback is not None:
            ckpt = ray.train.Checkpoint(str(fallback))
    if ckpt is None and config.get("resume_from"):
        ckpt = ray.train.Checkpoint(config["resume_from"])
    if ckpt is None:
        return {"step": 0, "epoch": 0, "micro": 0}
    with ckpt.as_directory() as folder:
        state = policy.load_checkpoint(Path(folder))
    state["resumed_from"] = ckpt.path
    return state


def _checkpoint(policy: Any, state: dict[str, Any], metrics: dict[str, Any], rank: int) -> None:
    import ray.train

    folder = Path(tempfile.mkdtemp(prefix=f"ecd-ckpt-r{rank}-"))
    try:
        policy.save_checkpoint(folder, state, rank)
        shared = policy.cfg.strategy == "deepspeed" or rank == 0  # ZeRO: every rank's shards
        if shared:
            writers = ray.train.get_context().get_world_size() \
                if policy.cfg.strategy == "deepspeed" else 1
            _seal(folder, rank, writers)
        ckpt = ray.train.Checkpoint.from_directory(str(folder)) if shared else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{state['step']:06d}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _worker_shards(stages: list[int] | None) -> list[tuple[int | None, Any]]:
    """This worker's data: ``[(None, shard)]``, or one ``(stage, shard)`` per stage, in order."""
    import ray.train

    if stages is None:
        return [(None, ray.train.get_dataset_shard("train"))]
    return [(s, ray.train.get_dataset_shard(stage_dataset_name(s))) for s in stages]


def _log_micro(file: Any, epoch: int, micro: int, step: int, mb: MicroBatch) -> None:
    """One line of ``data_log``: what this worker trained on, in the order it did."""
    file.write(json.dumps({"epoch": epoch, "micro": micro, "step": step, "stage": mb.stage,
                           "pair_ids": mb.pair_ids}) + "\n")
    file.flush()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; everything it needs comes through ``config``."""
    import ray.train
    from transformers import AutoTokenizer

    from ecd_ray.train.policy import Policy, torch_dtype

    cfg = TrainConfig.model_validate_json(config["cfg_json"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir, model_dir = Path(config["run_dir"]), Path(config["model_dir"])
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    policy = Policy(cfg, model_dir, config["total_steps"])
    ref_model = None
    if cfg.reference == "resident":
        from transformers import AutoModelForCausalLM

        # The policy's compute precision and device (the precision rule in reference.py).
        ref_model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype(cfg, policy.on_gpu),
            trust_remote_code=cfg.trust_remote_code).to(policy.device).eval()
    state = _restore(policy, config)
    logger = _Logger(run_dir, rank, cfg.tensorboard)
    if rank == 0:
        print(f"[ecd-ray] batch layout: {policy.layout}"
              f"{' (auto)' if cfg.layout == 'auto' else ''}", flush=True)
    if rank == 0 and state.get("resumed_from"):
        print(f"[ecd-ray] resumed at step {state['step']} from {state['resumed_from']}",
              flush=True)
    shards = _worker_shards(config["stages"])
    data_log = None
    if cfg.data_log:
        (run_dir / "data_log").mkdir(exist_ok=True)
        data_log = (run_dir / "data_log" / f"rank{rank}.jsonl").open("a")
    micro_per_epoch = config["steps_per_epoch"] * cfg.grad_accum
    fail_spec = os.environ.get(FAIL_AT_STEP_ENV, "0").split(":")
    fail_at, fail_kill = int(fail_spec[0]), fail_spec[1:] == ["kill"]
    fail_once = rank == 0 and not (run_dir / ".failed").exists()
    step = state["step"]
    trim = None if policy.on_gpu else _heap_trimmer()
    for epoch in range(state["epoch"], cfg.epochs):
        skip = state["micro"] if epoch == state["epoch"] else 0
        outs: list[LossOutput] = []
        tokens, started = 0, time.perf_counter()
        for micro, mb in enumerate(micro_batches(shards, cfg, tokenizer, epoch,
                                                 micro_per_epoch, policy.layout)):
            if step >= config["total_steps"]:
                break
            if micro < skip:
                continue  # consumed before the checkpoint we resumed from
            batch, ref = mb.tensors, mb.ref
            if data_log is not None:
                _log_micro(data_log, epoch, micro, step + 1, mb)
            if ref_model is not None:
                with torch.inference_mode():
                    c, r, _, _ = concatenated_logprobs(ref_model, batch)
                ref = (c.double(), r.double())
            if not outs:
                lr = policy.lr()  # the rate this optimizer step uses
            outs.append(policy.forward_backward(batch, ref))
            if trim is not None:
                # A micro-batch's activations (GiBs on CPU) are freed into glibc's heap, which
                # keeps the pages; the next micro-batch's differently sized blocks then take
                # new ones, and the RSS ratchets up step by step. Returning the free pages
                # after each micro-batch keeps the peak at the states plus one micro-batch.
                trim(0)
            tokens += int(batch["sequence_tokens"])  # prompt+chosen plus prompt+rejected
            if fail_kill and fail_once and step + 1 == fail_at and len(outs) == 1:
                (run_dir / ".failed").write_text("killed\n")
                os.kill(os.getpid(), signal.SIGKILL)
            if (micro + 1) % cfg.grad_accum:
                continue
            step += 1
            metrics = {"step": step, "epoch": epoch, "lr": lr,
                       **_step_metrics(outs, tokens, started, world)}
            if mb.stage is not None:  # the same on every worker (see curriculum_datasets)
                metrics["stage"] = mb.stage
            logger.write(metrics)
            state = {"step": step, "epoch": epoch, "micro": micro + 1}
            if fail_at and not fail_kill and fail_once and step == fail_at:
                (run_dir / ".failed").write_text("injected\n")
                raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV})")
            if step % cfg.checkpoint_every == 0 or step == config["total_steps"]:
                _checkpoint(policy, state, metrics, rank)
            else:
                ray.train.report(metrics)
            outs, tokens, started = [], 0, time.perf_counter()
        state = {"step": step, "epoch": epoch + 1, "micro": 0}
    if data_log is not None:
        data_log.close()
    policy.export(run_dir / "model", rank)
    if rank == 0:
        tokenizer.save_pretrained(run_dir / "model")
        policy.module.generation_config.save_pretrained(run_dir / "model")


# ---------------------------------------------------------------------------------------------
# Driver


SEAL = "ecd_complete_rank{rank}.json"


def _seal(folder: Path, rank: int, writers: int) -> None:
    """Record, last, what this rank's part of a checkpoint holds: every file and its size.
    A checkpoint folder is whole only when every writing rank's record is there and matches."""
    files = {str(p.relative_to(folder)): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / SEAL.format(rank=rank)).write_text(json.dumps(
        {"rank": rank, "writers": writers, "files": files}, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a whole checkpoint (a write cut short, a file deleted or
    truncated since), or None when every writing rank's record is there and every file it
    lists has its recorded size."""
    seals = sorted(folder.glob(SEAL.format(rank="*")))
    if not seals:
        return "no completion record (the write never finished, or it predates them)"
    try:
        writers = json.loads(seals[0].read_text())["writers"]
        for rank in range(writers):
            seal = folder / SEAL.format(rank=rank)
            if not seal.is_file():
                return f"rank {rank} of {writers} never finished writing its part"
            for name, size in json.loads(seal.read_text())["files"].items():
                f = folder / name
                if not f.is_file():
                    return f"{name} is missing"
                if f.stat().st_size != size:
                    return f"{name} has {f.stat().st_size} bytes, {size} were written"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable completion record ({exc})"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest-step whole checkpoint any earlier attempt of this run wrote; a damaged one
    (see :func:`checkpoint_problem`) is passed over with a warning naming what is wrong."""
    found = sorted(run_dir.glob("ray/*/step_*"), key=lambda p: int(p.name.split("_")[1]))
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("passing over checkpoint %s: %s", path, problem)
    return None


RESUME_KEY_FILE = "resume_key.json"

# The fields a resumed run must share with the attempt that wrote its checkpoint. Every attempt
# records them in <run>/resume_key.json once its config has passed the check; an attempt that
# resumes compares, before any work, and is refused (ResumeMismatch names each field) when one
# differs.
RESUME_KEY_FIELDS = (
    # Which pairs each worker reads, in which order: the pairs' content (a moved copy is the
    # same), the first max_pairs, the source read (pairs_ref/ or pairs/: their blocks split
    # differently over the workers), the split, the chunk shuffle seed, the curriculum stages.
    "pairs", "max_pairs", "reference", "num_workers", "seed", "curriculum",
    # Which pairs make a micro-batch: bucketed by tokenised length within bucket_window (the
    # length a pair has in the layout's rows).
    "micro_batch_size", "bucket_window", "max_prompt_tokens", "max_length", "truncation",
    "layout",
    # Which micro-batches make an optimizer step (a resume skips step x grad_accum of the
    # epoch) and how many steps there are (the length of the cosine or linear decay).
    "grad_accum", "epochs", "max_steps",
    # The schedule and optimizer: DDP's checkpoint restores the lr and weight decay themselves
    # (LambdaLR's base_lrs, the optimizer's param groups) while DeepSpeed recomputes the lr
    # from the config, so a changed value would be ignored or applied depending on the
    # strategy; a changed schedule or warm-up bends the curve mid-run.
    "lr", "schedule", "warmup_steps", "optimizer", "weight_decay",
    # What the checkpoint holds: the model's weights (by content) and their layout.
    "model", "strategy", "zero_stage",
)
# The fields a resume may change. They take effect from the resumed step on and leave the data
# order and the schedule alone: the loss and its coefficients, clipping, how log-probs are
# computed, precision, placement and memory options (a checkpoint that cannot be loaded with
# them fails loudly), checkpoints, logs, and the run's name and place.
RESUME_FREE_FIELDS = (
    "run_name", "output_dir", "overwrite", "resume_from",
    "loss", "beta", "label_smoothing", "nll_weight", "slic_delta", "slic_reg_weight",
    "clip_grad", "logprobs", "logprob_chunk", "gradient_checkpointing",
    "cpus_per_worker", "use_gpu", "dtype", "offload_optimizer", "offload_params",
    "reference_gpus",  # the reference pool's layout; its output is reused or keyed anyway
    "param_persistence_threshold", "deepspeed_config",
    "trust_remote_code",  # how the same weights are loaded; refusing a resume gains nothing
    "checkpoint_every", "keep_checkpoints", "max_failures", "tensorboard", "data_log", "ray",
)


class ResumeMismatch(ValueError):
    """A resume whose config differs from its run's in a field of RESUME_KEY_FIELDS."""


def resume_key(cfg: TrainConfig, model_dir: Path) -> dict[str, Any]:
    """The values of RESUME_KEY_FIELDS; the pairs and the model as ``{path, fingerprint}``."""
    key: dict[str, Any] = {name: getattr(cfg, name) for name in RESUME_KEY_FIELDS}
    key["pairs"] = pairs_identity(Path(cfg.pairs))
    key["model"] = model_identity(model_dir)
    return key


def check_resume(checkpoint: Path, key: Mapping[str, Any], run_dir: Path) -> None:
    """Refuse to resume from ``checkpoint`` (``<run>/ray/attempt-N/step_X``) when ``key``
    differs from the one its run recorded; a run recorded without one is resumed unchecked."""
    recorded_in = next((d / RESUME_KEY_FILE for d in checkpoint.parents[:3]
                        if (d / RESUME_KEY_FILE).is_file()), None)
    if recorded_in is None:
        print(f"[ecd-ray] no {RESUME_KEY_FILE} recorded for {checkpoint} (an older version "
              "wrote it): resuming without checking the config against it", flush=True)
        return
    recorded = json.loads(recorded_in.read_text())["fields"]
    diffs = key_differences(recorded, key, missing_differs=False)
    if not diffs:
        return
    keep = " ".join(
        f"{f}={recorded[f]['path'] if isinstance(recorded[f], dict) else show_value(recorded[f])}"
        for f, _, _ in diffs)
    raise ResumeMismatch(
        f"cannot resume from {checkpoint}: {len(diffs)} setting(s) that decide the run's data "
        "order, step schedule or checkpoint contents differ from the ones it started with "
        f"(recorded in {recorded_in}):\n"
        + "".join(f"  - {f}: {old} when the run started, {new} now\n" for f, old, new in diffs)
        + f"To resume, use the recorded value(s): {keep}. To train with the new value(s), "
        f"start a new run: overwrite=true (deletes {run_dir} and its checkpoints) or another "
        "run_name.")


def init_ray(cfg: TrainConfig) -> bool:
    """Start local Ray (or join ``ray.address``/``RAY_ADDRESS``) for training, unless Ray is
    already up; True when this call started it (the caller then shuts it down). Several
    ``train`` calls inside one such session share one cluster instead of starting one each."""
    import ray

    if ray.is_initialized():
        return False
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not cfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env})
        return True
    # Logical CPUs: the workers plus headroom for Ray Data's read and split tasks.
    needed = int(cfg.num_workers * cfg.cpus_per_worker + 2)
    with local_ray_on_loopback():  # its servers listen on 127.0.0.1 only
        ray.init(address="local",
                 num_cpus=cfg.ray.num_cpus or max(os.cpu_count() or 1, needed),
                 include_dashboard=False, runtime_env={
                     "env_vars": env,
                     "worker_process_setup_hook": "ecd_ray.ray_setup.quiet_local_ray_logs"})
    return True


def _reference_stage(cfg: TrainConfig, model_dir: Path) -> Path:
    from ecd_ray.train.reference import add_reference_logprobs, reference_layout

    out = cfg.run_dir.resolve() / "pairs_ref"
    done = out / "_SUCCESS"
    layout = reference_layout(cfg)
    # The marker records what the log-probs were computed from: reused only when all agree.
    key = reference_key(Path(cfg.pairs), model_dir, collate_config(cfg), cfg.max_pairs,
                        layout.dtype)
    if done.exists():
        try:
            recorded = json.loads(done.read_text()).get("key")
        except (ValueError, AttributeError):
            recorded = None
        diffs = key_differences(recorded, key) if isinstance(recorded, dict) else None
        if diffs == []:
            return out
        why = ", ".join(f"{f} {old} -> {new}" for f, old, new in diffs) if diffs else \
            "its marker does not record what they were computed from"
        print(f"[ecd-ray] recomputing the reference log-probs in {out}: {why}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    # The training workers do not exist yet: the reference pool takes their resources.
    print(f"[ecd-ray] reference log-probs: {layout.replicas} actor(s) x {layout.cpus:g} CPU"
          f"{f' x {layout.gpus} GPU' if layout.gpus else ''}, {layout.dtype}", flush=True)
    add_reference_logprobs(Path(cfg.pairs).resolve(), out, model_dir, collate_config(cfg),
                           limit=cfg.max_pairs, replicas=layout.replicas, cpus=layout.cpus,
                           gpus=layout.gpus, dtype=layout.dtype,
                           trust_remote_code=cfg.trust_remote_code, layout=cfg.layout)
    done.write_text(json.dumps({"seconds": round(time.time() - t, 1), "model": str(model_dir),
                                "layout": layout.__dict__, "key": key}, indent=2))
    log.info("reference log-probs written to %s in %.0f s", out, time.time() - t)
    return out


def plan_steps(cfg: TrainConfig, n_pairs: int, per_stage: Mapping[int, int] | None = None
               ) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps); every worker runs the same number. With a
    curriculum, each stage is split on its own, so a worker gets ``n_s // num_workers`` pairs
    of each stage ``s`` (``per_stage``: pairs per stage)."""
    per_step = cfg.micro_batch_size * cfg.grad_accum
    if per_stage is None:
        per_worker = n_pairs // cfg.num_workers
    else:
        per_worker = sum(n // cfg.num_workers for n in per_stage.values())
    steps_per_epoch = per_worker // per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"{n_pairs} pairs are too few for one optimizer step of micro_batch_size "
            f"({cfg.micro_batch_size}) x grad_accum ({cfg.grad_accum}) x num_workers "
            f"({cfg.num_workers}): lower one of them")
    total = steps_per_epoch * cfg.epochs
    return steps_per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def _no_stage(where: str) -> str:
    return (f"curriculum=true needs the pairs' '{STAGE_COLUMN}' column (ecd_ray/curriculum.py), "
            f"and {where}: regenerate the pairs with a version of ecd-ray that writes "
            f"'difficulty' and '{STAGE_COLUMN}' (or add them with ecd_ray.curriculum.annotate), "
            "or set curriculum=false")


def check_stage_column(pairs: Path) -> None:
    """Fail before any work (the reference stage included) when a Parquet file of ``pairs`` (a
    file or a folder of shards) has no ``stage`` column or an empty one; reads only that
    column."""
    files = [pairs] if pairs.is_file() else sorted(pairs.glob("*.parquet"))
    for path in files:
        if STAGE_COLUMN not in pq.read_schema(path).names:
            raise ValueError(_no_stage(f"{path} has none (written before curricula existed?)"))
        nulls = pq.read_table(path, columns=[STAGE_COLUMN]).column(STAGE_COLUMN).null_count
        if nulls:
            raise ValueError(_no_stage(f"{nulls} pairs of {path} have it empty (null)"))


def stage_counts(ds: Any) -> dict[int, int]:
    """Pairs per curriculum stage, in one pass over the ``stage`` column of a Ray Dataset;
    refuses pairs without a stage (null)."""
    counts: Counter[int] = Counter()
    nulls = 0
    for table in ds.select_columns([STAGE_COLUMN]).iter_batches(batch_format="pyarrow"):
        column = table.column(STAGE_COLUMN)
        nulls += column.null_count
        counts.update(s for s in column.to_pylist() if s is not None)
    if nulls:
        raise ValueError(_no_stage(f"{nulls} pairs have it empty (null)"))
    return dict(counts)


def stage_dataset_name(stage: int) -> str:
    return f"stage_{stage}"


def curriculum_datasets(ds: Any, counts: Mapping[int, int], num_workers: int
                        ) -> tuple[dict[str, Any], list[int]]:
    """One Ray Dataset per curriculum stage (``stage_0``, ``stage_1``, ...), and the stages in
    training order.

    Why one dataset per stage: Ray Train splits each dataset over the workers with
    ``streaming_split(equal=True)``, which hands out blocks as the workers ask for them; that
    promises every worker a share, not an order. A global ``ds.sort("stage")`` before a single
    split is therefore not a per-worker guarantee (and it is an all-to-all shuffle that holds
    the whole dataset in the object store). With one split per stage, each worker reads its
    stage-0 shard to the end before it starts its stage-1 shard (:func:`micro_batches`), so
    the order holds on every worker by construction, and each stage still streams: nothing is
    materialised. Within a stage, pairs are length-bucketed and shuffled per chunk of
    ``bucket_window`` micro-batches as without a curriculum.

    ``equal=True`` gives every worker ``n_s // num_workers`` pairs of stage ``s``, so all
    workers have the same number of micro-batches in each stage: they change stage at the
    same step and stop at the same step (:func:`plan_steps` counts those pairs). A stage with
    fewer pairs than workers would give each worker none; it is left out (with a warning).
    The micro-batch index runs across the stages, so a resumed run skips the micro-batches it
    had consumed exactly as without a curriculum. Each stage re-reads the pairs through its
    filter (one Parquet scan per stage).
    """
    from ray.data.expressions import col

    stages = []
    for s in sorted(counts):
        if counts[s] < num_workers:
            log.warning("curriculum stage %d has %d pairs, fewer than the %d workers: skipped",
                        s, counts[s], num_workers)
            continue
        stages.append(s)
    return {stage_dataset_name(s): ds.filter(expr=col(STAGE_COLUMN) == s) for s in stages}, stages


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary it writes to ``train_summary.json``.

    The run folder's lock (:mod:`ecd_ray.runlock`) is held throughout, so a second run on the
    folder (or its ``overwrite=true``) is refused with :class:`~ecd_ray.runlock.RunLocked`.
    """
    if cfg.curriculum:  # an input check: refused before the run folder exists
        check_stage_column(Path(cfg.pairs).resolve())
    with runlock.hold(cfg.run_dir.resolve()):
        return _train_locked(cfg)


def _train_locked(cfg: TrainConfig) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ecd_ray.models import resolve_model

    run_dir = cfg.run_dir.resolve()
    if cfg.overwrite:
        runlock.clear_run_dir(run_dir)  # everything but the lock this process holds
    if (run_dir / "train_summary.json").exists():
        raise FileExistsError(f"{run_dir} holds a finished training run; set overwrite=true or "
                              "choose another run_name")
    model_dir = resolve_model(cfg.model)
    # A resume whose data order or schedule would differ is refused before anything is written.
    resume = Path(cfg.resume_from).resolve() if cfg.resume_from else latest_checkpoint(run_dir)
    if cfg.resume_from and (problem := checkpoint_problem(resume)) is not None:
        raise ValueError(f"resume_from={cfg.resume_from} is not a whole checkpoint: {problem}")
    key = resume_key(cfg, model_dir)
    if resume is not None:
        check_resume(resume, key, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(cfg.model_dump_json(indent=2))  # this attempt's
    (run_dir / RESUME_KEY_FILE).write_text(json.dumps({"fields": key}, indent=2))
    started_ray = init_ray(cfg)
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        source = _reference_stage(cfg, model_dir) if cfg.reference == "precomputed" else \
            Path(cfg.pairs).resolve()
        ds = read_parquet(str(source), num_cpus=0.25)
        if cfg.max_pairs is not None:
            ds = ds.limit(cfg.max_pairs)
        counts, stages, datasets = None, None, {"train": ds}
        if cfg.curriculum:
            counts = stage_counts(ds)
            datasets, stages = curriculum_datasets(ds, counts, cfg.num_workers)
        n_pairs = sum(counts.values()) if counts is not None else ds.count()
        steps_per_epoch, total_steps = plan_steps(cfg, n_pairs, counts)
        attempt = len(list(run_dir.glob("ray/attempt-*")))
        started = time.time()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "cfg_json": cfg.model_dump_json(), "run_dir": str(run_dir),
                "model_dir": str(model_dir), "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps, "resume_from": str(resume) if resume else None,
                "stages": stages,
            },
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=RunConfig(
                storage_path=str(run_dir / "ray"), name=f"attempt-{attempt}",
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
            datasets=datasets,
        )
        result = trainer.fit()
    finally:
        if started_ray:
            ray.shutdown()
    if result.error:
        raise result.error
    return _summarise(cfg, run_dir, n_pairs, total_steps, started, resume)


def _summarise(cfg: TrainConfig, run_dir: Path, n_pairs: int, total_steps: int,
               started: float, resumed: Path | None) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    steady = records[1:] or records  # the first step includes warm-up costs
    summary = {
        "run_dir": str(run_dir), "model": str(run_dir / "model"), "pairs": n_pairs,
        "steps": last["step"], "planned_steps": total_steps,
        "resumed_from": str(resumed) if resumed else None,
        "elapsed_s": round(time.time() - started, 1),
        "first_loss": records[0]["loss"], "final_loss": last["loss"],
        "final_reward_accuracy": last["rewards/accuracy"],
        "mean_step_time_s": sum(r["step_time_s"] for r in steady) / len(steady),
        "mean_tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
        "peak_rss_gib_per_worker": max(r["peak_rss_gib"] for r in records),
        "config": cfg.model_dump(mode="json"),
    }
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
