"""The policy under training, without Ray: DeepSpeed (ZeRO 0-3) or plain DDP/single-process
torch, behind one small class, plus the preference loss of one micro-batch.

:class:`Policy` owns the model, optimiser and schedule and exposes ``backward``/``step``,
checkpoint save/load, and export to an HF folder. The Ray layer (:mod:`ecd_ray.train.trainer`)
only feeds it batches and reports.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ecd_ray.config import TrainConfig, deep_merge
from ecd_ray.train.collate import concatenated_logprobs, resolve_layout
from ecd_ray.train.losses import LOSSES, LossOutput


def torch_dtype(cfg: TrainConfig, on_gpu: bool) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def gradient_checkpointing(cfg: TrainConfig, on_gpu: bool) -> bool:
    return cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and on_gpu)


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce kernel.

    ``deepspeed.init_distributed`` on CPU builds ``deepspeed_shm_comm`` with g++ (45-65 s on
    2 cores whenever the torch-extensions cache misses, which it did on alternate runs here).
    It serves only DeepSpeed's inference all-reduce; ZeRO's all-gathers and reduce-scatters
    go through torch.distributed (gloo) either way. Marking the op incompatible makes
    DeepSpeed skip it (``build_shm_op`` returns None) and use torch.distributed throughout."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _hidden_size(model_dir: Path, cfg: TrainConfig) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "hidden_size", None)
    return int(value) if value else None


def deepspeed_config(cfg: TrainConfig, total_steps: int, on_gpu: bool,
                     hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON generated from the project config (``cfg.deepspeed_config``, a JSON
    file, is merged over it).

    With the model's ``hidden_size`` h, ZeRO-3's buckets follow the sizes HF's integration
    calls "auto": reduce bucket h^2 elements, prefetch bucket 0.9 h^2. DeepSpeed's own
    defaults (5e8 and 5e7 elements) are sized for multi-billion models; on SmolLM2-135M in
    fp32 the 5e8-element reduce bucket fills with the whole gradient before it is flushed
    (a probe of 2 workers peaked 0.54 GiB lower per worker with the HF sizes)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero |= {"stage3_param_persistence_threshold": cfg.param_persistence_threshold,
                 "stage3_gather_16bit_weights_on_model_save": True}
        if hidden_size:
            zero |= {"reduce_bucket_size": hidden_size * hidden_size,
                     "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size)}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.optimizer == "adamw":
        # torch's AdamW on CPU: DeepSpeed's fused/CPU Adam would need a C++ build.
        optimizer = {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                 "torch_adam": not on_gpu}}
    else:
        optimizer = {"type": "SGD", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay}}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        "optimizer": optimizer,
        # No "scheduler": Policy passes lr_lambda's LambdaLR to deepspeed.initialize, the
        # schedule the DDP path uses. DeepSpeed's own WarmupCosineLR forces at least 2 warm-up
        # steps and a log-shaped warm-up, so the two strategies (and TRL) would differ. A
        # "scheduler" in deepspeed_config (the JSON override) is used instead when given.
        "bf16": {"enabled": torch_dtype(cfg, on_gpu) == torch.bfloat16},
    }
    if cfg.optimizer == "sgd" and cfg.zero_stage > 0:
        config["zero_allow_untested_optimizer"] = True  # DeepSpeed vets only Adam-family
    if cfg.clip_grad is not None:
        config["gradient_clipping"] = cfg.clip_grad
    if cfg.deepspeed_config:
        config = deep_merge(config, json.loads(Path(cfg.deepspeed_config).read_text()))
    return config


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Any:
    """The lr schedule of both strategies, a multiplier of ``cfg.lr`` per optimizer step: linear
    warm-up over ``warmup_steps``, then cosine to 0 / linear to 0 / constant (step k of the run
    uses ``factor(k)``; TRL's and transformers' cosine schedule without warm-up is the same)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def preference_loss(cfg: TrainConfig, policy: tuple[Tensor, Tensor, Tensor, Tensor],
                    ref_chosen: Tensor | None, ref_rejected: Tensor | None) -> LossOutput:
    """The configured loss of one micro-batch; ``policy`` is concatenated_logprobs' output."""
    chosen, rejected, chosen_tokens, rejected_tokens = policy
    common = {"policy_chosen": chosen, "ref_chosen": ref_chosen}
    options: dict[str, dict[str, Any]] = {
        "dpo": {"policy_rejected": rejected, "ref_rejected": ref_rejected, "beta": cfg.beta,
                "label_smoothing": cfg.label_smoothing},
        "ipo": {"policy_rejected": rejected, "ref_rejected": ref_rejected, "beta": cfg.beta},
        "slic": {"policy_rejected": rejected, "ref_rejected": ref_rejected, "beta": cfg.beta,
                 "delta": cfg.slic_delta, "reg_weight": cfg.slic_reg_weight,
                 "chosen_tokens": chosen_tokens},
        "sft": {"chosen_tokens": chosen_tokens, "policy_rejected": rejected,
                "ref_rejected": ref_rejected, "beta": cfg.beta},
        "dpo_nll": {"policy_rejected": rejected, "ref_rejected": ref_rejected, "beta": cfg.beta,
                    "nll_weight": cfg.nll_weight, "chosen_tokens": chosen_tokens},
    }
    return LOSSES[cfg.loss](**common, **options[cfg.loss])


class Policy:
    """A causal LM being trained, with its optimiser: DeepSpeed engine or torch module."""

    def __init__(self, cfg: TrainConfig, model_dir: Path, total_steps: int, *,
                 distributed: bool = True):
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.on_gpu = cfg.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else \
            torch.device("cpu")
        dtype = torch_dtype(cfg, self.on_gpu)
        self.micro_steps = 0
        if cfg.strategy == "deepspeed":
            os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.on_gpu else "cpu")
            import deepspeed

            if not self.on_gpu:
                _skip_shm_comm_build()
            deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo")
            self.ds_config = deepspeed_config(cfg, total_steps, self.on_gpu,
                                              hidden_size=_hidden_size(model_dir, cfg))
            hf_ds = None
            if cfg.zero_stage == 3:
                from transformers.integrations.deepspeed import HfDeepSpeedConfig

                hf_ds = HfDeepSpeedConfig(self.ds_config)  # partitions the weights at load
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
            own = "scheduler" in self.ds_config  # set in the deepspeed_config JSON override
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=model.parameters(), config=self.ds_config,
                lr_scheduler=None if own else lambda opt: torch.optim.lr_scheduler.LambdaLR(
                    opt, lr_lambda(cfg, total_steps)))
            del hf_ds
            if own:
                # DeepSpeed's schedulers start at iteration -1, i.e. lr 0 for the first
                # optimiser step; start at 0 so that step k uses the schedule's k-th value.
                self.engine.lr_scheduler.step(0)
            self.model = self.engine
            self.module = self.engine.module
        else:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, trust_remote_code=cfg.trust_remote_code).to(self.device)
            self.module = model
            if distributed:
                import ray.train.torch

                model = ray.train.torch.prepare_model(model)
            self.model = model
            opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.SGD
            self.optimizer = opt_cls(self.module.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lr_lambda(cfg, total_steps))
        if gradient_checkpointing(cfg, self.on_gpu):
            self.module.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.chunk = cfg.logprob_chunk if cfg.logprobs == "chunked" else None
        self.layout = resolve_layout(cfg.layout, self.module.config)
        self.model.train()

    # -- one micro-batch ---------------------------------------------------------------------

    def forward_backward(self, batch: dict[str, Tensor], ref: tuple[Tensor, Tensor] | None
                         ) -> LossOutput:
        """Loss of one micro-batch and its backward pass (scaled for accumulation)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ref_c, ref_r = (ref[0].to(self.device), ref[1].to(self.device)) if ref else (None, None)
        if self.cfg.strategy == "deepspeed":
            out = preference_loss(self.cfg, concatenated_logprobs(self.model, batch,
                                                                  chunk=self.chunk), ref_c, ref_r)
            self.engine.backward(out.losses.mean())  # DeepSpeed divides by grad accumulation
            self.engine.step()  # steps the optimiser only at accumulation boundaries
        else:
            self.micro_steps += 1
            boundary = self.micro_steps % self.cfg.grad_accum == 0
            # DDP all-reduces gradients in backward; between accumulation boundaries that is
            # wasted traffic, so it only happens on the micro-batch that ends the step.
            no_sync = getattr(self.model, "no_sync", None)
            with contextlib.nullcontext() if boundary or no_sync is None else no_sync():
                out = preference_loss(self.cfg, concatenated_logprobs(
                    self.model, batch, chunk=self.chunk), ref_c, ref_r)
                (out.losses.mean() / self.cfg.grad_accum).backward()
            if boundary:
                if self.cfg.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.clip_grad)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return out

    def lr(self) -> float:
        if self.cfg.strategy == "deepspeed":
            return float(self.engine.get_lr()[0])
        return float(self.scheduler.get_last_lr()[0])

    # -- checkpoints and export --------------------------------------------------------------

    def save_checkpoint(self, folder: Path, state: dict[str, Any], rank: int) -> None:
        """Every rank writes its part (ZeRO shards); ``state`` is stored with it."""
        if self.cfg.strategy == "deepspeed":
            self.engine.save_checkpoint(str(folder), tag="state", client_state=state)
        elif rank == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "state": state},
                       folder / "ddp_state.pt")

    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        if self.cfg.strategy == "deepspeed":
            _, state = self.engine.load_checkpoint(str(folder), tag="state")
            if state is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder}")
            return state
        blob = torch.load(folder / "ddp_state.pt", map_location=self.device, weights_only=False)
        self.module.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        return blob["state"]

    def export(self, folder: Path, rank: int) -> None:
        """Write an HF-format model folder (ZeRO-3 shards gathered); a collective call."""
        state = None
        if self.cfg.strategy == "deepspeed" and self.cfg.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # all ranks take part
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            self.module.save_pretrained(folder, state_dict=state, safe_serialization=True)
