"""``ecd-ray train``: preference training on Ray Train (the one training module that knows Ray).

The driver reads the pairs with ``ray.data.read_parquet`` (after the reference stage has added
reference log-probs), and a ``TorchTrainer`` streams each worker its shard
(``datasets=`` + ``get_dataset_shard``). Each worker wraps the policy in DeepSpeed ZeRO (or
DDP), buckets pairs by length into micro-batches, and reports metrics every optimiser step and
a checkpoint every ``checkpoint_every`` steps. A restarted or resumed run loads the last
checkpoint and skips the micro-batches it had consumed. At the end the (ZeRO-3 sharded) model
is gathered into an HF folder, ``<run>/model``, that transformers and vLLM load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ecd_ray.config import TrainConfig
from ecd_ray.train.collate import (
    CollateConfig,
    bucket_batches,
    collate_pairs,
    concatenated_logprobs,
    pad_token_id,
    tokenize_table_rows,
)
from ecd_ray.train.losses import LossOutput, reward_metrics
from ecd_ray.train.reference import REF_COLUMNS

log = logging.getLogger(__name__)

FAIL_AT_STEP_ENV = "ECD_RAY_FAIL_AT_STEP"  # test hook: crash rank 0 once at this step


def collate_config(cfg: TrainConfig) -> CollateConfig:
    return CollateConfig(max_prompt_tokens=cfg.max_prompt_tokens, max_length=cfg.max_length,
                         truncation=cfg.truncation)


def _chunk_seed(seed: int, epoch: int, chunk: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{chunk}".encode()).digest()[:4],
                          "little")


def micro_batches(shard: Any, cfg: TrainConfig, tokenizer: Any, epoch: int, limit: int
                  ) -> Iterator[tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
                                      | None]]:
    """The first ``limit`` length-bucketed micro-batches of this worker's shard for ``epoch``,
    in a deterministic order, with their precomputed reference log-probs (if any)."""
    n = 0
    span = cfg.bucket_window * cfg.micro_batch_size
    pad = pad_token_id(tokenizer)
    for chunk, table in enumerate(shard.iter_batches(batch_size=span, batch_format="pyarrow")):
        rows = table.to_pylist()
        pairs = tokenize_table_rows(tokenizer, rows, collate_config(cfg))
        order = bucket_batches([p.length for p in pairs], cfg.micro_batch_size,
                               window=cfg.bucket_window, seed=_chunk_seed(cfg.seed, epoch, chunk))
        for idx in order:
            if n >= limit:
                return
            ref = None
            if cfg.reference == "precomputed":
                ref = (torch.tensor([rows[i][REF_COLUMNS[0]] for i in idx], dtype=torch.float64),
                       torch.tensor([rows[i][REF_COLUMNS[1]] for i in idx], dtype=torch.float64))
            yield collate_pairs([pairs[i] for i in idx], pad), ref
            n += 1


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
        ckpt = ray.train.Checkpoint.from_directory(str(folder)) if shared else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{state['step']:06d}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; everything it needs comes through ``config``."""
    import ray.train
    from transformers import AutoTokenizer

    from ecd_ray.train.policy import Policy

    cfg = TrainConfig.model_validate_json(config["cfg_json"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir, model_dir = Path(config["run_dir"]), Path(config["model_dir"])
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = Policy(cfg, model_dir, config["total_steps"])
    ref_model = None
    if cfg.reference == "resident":
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    state = _restore(policy, config)
    logger = _Logger(run_dir, rank, cfg.tensorboard)
    if rank == 0 and state.get("resumed_from"):
        print(f"[ecd-ray] resumed at step {state['step']} from {state['resumed_from']}",
              flush=True)
    shard = ray.train.get_dataset_shard("train")
    micro_per_epoch = config["steps_per_epoch"] * cfg.grad_accum
    fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "0"))
    step = state["step"]
    for epoch in range(state["epoch"], cfg.epochs):
        skip = state["micro"] if epoch == state["epoch"] else 0
        outs: list[LossOutput] = []
        tokens, started = 0, time.perf_counter()
        for micro, (batch, ref) in enumerate(micro_batches(shard, cfg, tokenizer, epoch,
                                                           micro_per_epoch)):
            if step >= config["total_steps"]:
                break
            if micro < skip:
                continue  # consumed before the checkpoint we resumed from
            if ref_model is not None:
                with torch.inference_mode():
                    c, r, _, _ = concatenated_logprobs(ref_model, batch)
                ref = (c.double(), r.double())
            if not outs:
                lr = policy.lr()  # the rate this optimizer step uses
            outs.append(policy.forward_backward(batch, ref))
            tokens += int(batch["attention_mask"].sum())
            if (micro + 1) % cfg.grad_accum:
                continue
            step += 1
            metrics = {"step": step, "epoch": epoch, "lr": lr,
                       **_step_metrics(outs, tokens, started, world)}
            logger.write(metrics)
            state = {"step": step, "epoch": epoch, "micro": micro + 1}
            if fail_at and step == fail_at and rank == 0 and not (run_dir / ".failed").exists():
                (run_dir / ".failed").write_text("injected\n")
                raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV})")
            if step % cfg.checkpoint_every == 0 or step == config["total_steps"]:
                _checkpoint(policy, state, metrics, rank)
            else:
                ray.train.report(metrics)
            outs, tokens, started = [], 0, time.perf_counter()
        state = {"step": step, "epoch": epoch + 1, "micro": 0}
    policy.export(run_dir / "model", rank)
    if rank == 0:
        tokenizer.save_pretrained(run_dir / "model")
        policy.module.generation_config.save_pretrained(run_dir / "model")


# ---------------------------------------------------------------------------------------------
# Driver


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest-step checkpoint any earlier attempt of this run wrote."""
    found = sorted(run_dir.glob("ray/*/step_*"), key=lambda p: int(p.name.split("_")[1]))
    return found[-1] if found else None


def _init_ray(cfg: TrainConfig) -> bool:
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
    ray.init(address="local", num_cpus=cfg.ray.num_cpus or max(os.cpu_count() or 1, needed),
             include_dashboard=False, runtime_env={"env_vars": env})
    return True


def _reference_stage(cfg: TrainConfig, model_dir: Path) -> Path:
    from ecd_ray.train.reference import add_reference_logprobs

    out = cfg.run_dir.resolve() / "pairs_ref"
    done = out / "_SUCCESS"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        t = time.time()
        # The training workers are idle during this stage: the reference uses their CPUs.
        add_reference_logprobs(Path(cfg.pairs).resolve(), out, model_dir, collate_config(cfg),
                               limit=cfg.max_pairs,
                               cpus=max(1, int(cfg.num_workers * cfg.cpus_per_worker)))
        done.write_text(json.dumps({"seconds": round(time.time() - t, 1),
                                    "model": str(model_dir)}))
        log.info("reference log-probs written to %s in %.0f s", out, time.time() - t)
    return out


def plan_steps(cfg: TrainConfig, n_pairs: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps); every worker runs the same number."""
    per_step = cfg.micro_batch_size * cfg.grad_accum
    steps_per_epoch = (n_pairs // cfg.num_workers) // per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"{n_pairs} pairs are too few for one optimizer step of micro_batch_size "
            f"({cfg.micro_batch_size}) x grad_accum ({cfg.grad_accum}) x num_workers "
            f"({cfg.num_workers}): lower one of them")
    total = steps_per_epoch * cfg.epochs
    return steps_per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary it writes to ``train_summary.json``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ecd_ray.models import resolve_model

    run_dir = cfg.run_dir.resolve()
    if cfg.overwrite:
        shutil.rmtree(run_dir, ignore_errors=True)
    if (run_dir / "train_summary.json").exists():
        raise FileExistsError(f"{run_dir} holds a finished training run; set overwrite=true or "
                              "choose another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(cfg.model_dump_json(indent=2))
    model_dir = resolve_model(cfg.model)
    started_ray = _init_ray(cfg)
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        source = _reference_stage(cfg, model_dir) if cfg.reference == "precomputed" else \
            Path(cfg.pairs).resolve()
        ds = ray.data.read_parquet(str(source), num_cpus=0.25)
        if cfg.max_pairs is not None:
            ds = ds.limit(cfg.max_pairs)
        n_pairs = ds.count()
        steps_per_epoch, total_steps = plan_steps(cfg, n_pairs)
        resume = cfg.resume_from or latest_checkpoint(run_dir)
        attempt = len(list(run_dir.glob("ray/attempt-*")))
        started = time.time()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "cfg_json": cfg.model_dump_json(), "run_dir": str(run_dir),
                "model_dir": str(model_dir), "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps, "resume_from": str(resume) if resume else None,
            },
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=RunConfig(
                storage_path=str(run_dir / "ray"), name=f"attempt-{attempt}",
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
            datasets={"train": ds},
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
