"""Reference-model log-probs of each pair's chosen and rejected answers, computed once before
training and stored in the pair rows, so that training holds only the policy model.
Tokenisation is the training collation's, so the numbers are the ones the loss would compute on
the fly.

The stage is a pool of Ray Data actors laid out like the training workers
(:func:`reference_layout`): on GPUs one actor per ``reference_gpus`` GPUs, in the policy's
compute precision (bf16 by default), on CPUs one actor per training worker with its CPUs, in
fp32. Every actor has a training worker's resource shape, so wherever training can be
scheduled, so can the reference stage; the pairs are sharded over the pool by blocks.

The stored log-probs are only valid for the inputs they were computed from: :func:`reference_key`
names them (pairs, ``max_pairs``, collation, model, dtype) with cheap content fingerprints
(:func:`fingerprint`), the trainer records the key with the output and recomputes when it
differs (:func:`key_differences` says why).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from ecd_ray.ray_setup import read_parquet
from ecd_ray.train.collate import (
    CollateConfig,
    collate,
    concatenated_logprobs,
    pad_token_id,
    resolve_layout,
    tokenize_table_rows,
)

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
# The precision rule: the reference runs in the policy's compute precision (fp32 on CPU, bf16
# on GPU unless dtype says otherwise), so that at step 0, when policy == reference, the DPO
# margin is exactly 0. The precision is part of reference_key: changing it recomputes.
REFERENCE_BATCH = 8  # pairs per reference forward


@dataclass(frozen=True)
class ReferenceLayout:
    """How the reference stage runs: ``replicas`` actors of ``cpus`` CPUs and ``gpus`` GPUs
    each, the model in ``dtype``."""

    replicas: int
    cpus: float
    gpus: int
    dtype: str


def reference_layout(cfg: Any) -> ReferenceLayout:
    """The reference pool of a TrainConfig (see the module docstring)."""
    dtype = cfg.dtype if cfg.dtype != "auto" else "bfloat16" if cfg.use_gpu else "float32"
    if cfg.use_gpu:
        if cfg.reference_gpus > cfg.num_workers:
            raise ValueError(f"reference_gpus ({cfg.reference_gpus}) exceeds the training "
                             f"workers' GPUs (num_workers={cfg.num_workers})")
        return ReferenceLayout(max(1, cfg.num_workers // cfg.reference_gpus),
                               cfg.cpus_per_worker, cfg.reference_gpus, dtype)
    return ReferenceLayout(cfg.num_workers, cfg.cpus_per_worker, 0, dtype)

# Files up to this size are hashed whole (configs, tokenizers, small Parquet shards); larger
# ones by size, their first and last 64 KiB (a safetensors header, a Parquet footer) and 64
# samples of 16 KiB spread over the file: a few MiB read even for a 70B model's shards.
_WHOLE_BYTES = 16 << 20
_EDGE_BYTES = 64 << 10
_SAMPLES, _SAMPLE_BYTES = 64, 16 << 10


def fingerprint(files: Iterable[Path], root: Path) -> str:
    """A sha256 over the names (relative to ``root``), sizes and contents (whole or sampled,
    see ``_WHOLE_BYTES``) of ``files``. Cheap, and equal for a copy of the same files; not a
    full hash, so two large files that differ only between the samples compare equal."""
    h = hashlib.sha256()
    for path in sorted(files):
        size = path.stat().st_size
        h.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= _WHOLE_BYTES:
                h.update(f.read())
                continue
            offsets = [0, size - _EDGE_BYTES]
            offsets += [(size - _SAMPLE_BYTES) * i // (_SAMPLES - 1) for i in range(_SAMPLES)]
            for i, offset in enumerate(offsets):
                f.seek(offset)
                h.update(f.read(_EDGE_BYTES if i < 2 else _SAMPLE_BYTES))
    return h.hexdigest()


def pairs_identity(pairs: Path) -> dict[str, str]:
    """The PAIRS Parquet file or folder (its shards, recursively) as ``{path, fingerprint}``."""
    pairs = pairs.resolve()
    if pairs.is_file():
        return {"path": str(pairs), "fingerprint": fingerprint([pairs], pairs.parent)}
    files = [p for p in pairs.rglob("*.parquet") if p.is_file()]
    return {"path": str(pairs), "fingerprint": fingerprint(files, pairs)}


def model_identity(model_dir: Path) -> dict[str, str]:
    """A model folder as ``{path, fingerprint}``: every file but hidden ones, so the weights,
    config.json and the tokenizer and chat template (which decide the tokens) all count."""
    model_dir = model_dir.resolve()
    files = [p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    return {"path": str(model_dir), "fingerprint": fingerprint(files, model_dir)}


def reference_key(pairs: Path, model_dir: Path, collate: CollateConfig,
                  limit: int | None, dtype: str = "float32") -> dict[str, Any]:
    """What stored reference log-probs depend on: which pairs (content, and the first
    ``limit``), how they are tokenised (the collation and the model's tokenizer), and the
    model's weights and precision."""
    return {"pairs": pairs_identity(pairs), "max_pairs": limit,
            "max_prompt_tokens": collate.max_prompt_tokens, "max_length": collate.max_length,
            "truncation": collate.truncation, "model": model_identity(model_dir),
            "dtype": dtype}


def show_value(value: Any) -> str:
    """A key value as a person (and an override) writes it."""
    if isinstance(value, Mapping) and "fingerprint" in value:
        return f"{value.get('path')} (content {str(value['fingerprint'])[:12]})"
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def key_differences(old: Mapping[str, Any], new: Mapping[str, Any], *,
                    missing_differs: bool = True) -> list[tuple[str, str, str]]:
    """``(field, old, new)`` for each field of ``new`` whose value differs in ``old``. Files
    (``{path, fingerprint}``) compare by fingerprint: a moved copy is the same input. A field
    ``old`` lacks (recorded by an older version) differs only with ``missing_differs``."""
    out = []
    for field, value in new.items():
        if field not in old:
            if missing_differs:
                out.append((field, "(not recorded)", show_value(value)))
            continue
        before = old[field]
        if isinstance(value, Mapping) and "fingerprint" in value:
            same = isinstance(before, Mapping) and \
                before.get("fingerprint") == value["fingerprint"]
        else:
            same = before == value
        if not same:
            out.append((field, show_value(before), show_value(value)))
    return out


@torch.inference_mode()
def reference_logprobs(model: Any, tokenizer: Any, rows: list[dict[str, Any]],
                       cfg: CollateConfig, batch_size: int = REFERENCE_BATCH,
                       device: torch.device | str = "cpu", layout: str = "auto"
                       ) -> tuple[list[float], list[float]]:
    """Summed response log-probs of chosen and rejected for each PAIRS row, in order.

    The rows are scored in batches of similar length (sorted by their length in ``layout``'s
    rows, an ``auto`` one resolved for ``model``), then put back in order."""
    layout = resolve_layout(layout, getattr(model, "config", None))
    pairs = tokenize_table_rows(tokenizer, rows, cfg)
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].row_length(layout))
    chosen = [0.0] * len(pairs)
    rejected = [0.0] * len(pairs)
    pad = pad_token_id(tokenizer)
    for start in range(0, len(pairs), batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in
                 collate([pairs[i] for i in idx], pad, layout).items()}
        c, r, _, _ = concatenated_logprobs(model, batch)
        for i, vc, vr in zip(idx, c.double().tolist(), r.double().tolist(), strict=True):
            chosen[i], rejected[i] = vc, vr
    return chosen, rejected


class ReferenceWorker:
    """Ray Data actor: adds ``ref_chosen_logp`` / ``ref_rejected_logp`` to PAIRS batches."""

    def __init__(self, model_dir: str, collate: dict[str, Any], threads: int = 1,
                 dtype: str = "float32", gpus: int = 0, trust_remote_code: bool = False,
                 layout: str = "auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir,
                                                       trust_remote_code=trust_remote_code)
        kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype),
                                  "trust_remote_code": trust_remote_code}
        if gpus > 1:
            kwargs["device_map"] = "auto"  # split over this actor's GPUs
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        if gpus == 1:
            self.model.to("cuda")
        self.device = next(self.model.parameters()).device
        self.model.eval()
        self.cfg = CollateConfig(**collate)
        self.layout = resolve_layout(layout, self.model.config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        for name in ("prompt", "chosen", "rejected"):
            if name not in batch.column_names:
                raise KeyError(f"reference stage needs column '{name}'; input has "
                               f"{batch.column_names}")
        chosen, rejected = reference_logprobs(self.model, self.tokenizer, batch.to_pylist(),
                                              self.cfg, device=self.device, layout=self.layout)
        batch = batch.drop_columns([c for c in REF_COLUMNS if c in batch.column_names])
        return batch.append_column(REF_COLUMNS[0], pa.array(chosen, pa.float64())).append_column(
            REF_COLUMNS[1], pa.array(rejected, pa.float64()))


def add_reference_logprobs(pairs_dir: Path, out_dir: Path, model_dir: Path,
                           collate: CollateConfig, *, limit: int | None = None,
                           replicas: int = 1, cpus: float = 1, gpus: int = 0,
                           dtype: str = "float32", block_rows: int = 32,
                           trust_remote_code: bool = False, layout: str = "auto") -> int:
    """The reference stage: read PAIRS shards (the first ``limit``), write them back with the
    two ref columns. ``replicas`` actors of ``cpus`` CPUs and ``gpus`` GPUs each share the
    blocks of ``block_rows`` pairs; returns the number of shards written."""
    import ray

    ds = read_parquet(str(pairs_dir), num_cpus=0.25)
    if limit is not None:
        ds = ds.limit(limit)
    # At least two blocks per actor, so that every actor of the pool gets work: an actor
    # takes whole blocks, and a small pairs file reads as one block. (Large inputs already
    # come in many blocks, one or more per file, and are not reshuffled.)
    n = ds.count()
    block_rows = max(1, min(block_rows, math.ceil(n / (2 * replicas))))
    if replicas > 1 and 0 < n <= 100_000:
        ds = ds.repartition(math.ceil(n / block_rows))
    ds = ds.map_batches(
        ReferenceWorker,
        fn_constructor_kwargs={"model_dir": str(model_dir), "collate": collate.__dict__,
                               "threads": max(1, math.floor(cpus)), "dtype": dtype,
                               "gpus": gpus, "trust_remote_code": trust_remote_code,
                               "layout": layout},
        batch_size=block_rows, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=replicas), num_cpus=cpus, num_gpus=gpus,
    )
    ds.write_parquet(str(out_dir), ray_remote_args={"num_cpus": 0.25})
    return sum(1 for _ in out_dir.glob("*.parquet"))
