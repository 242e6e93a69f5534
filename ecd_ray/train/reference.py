"""Reference-model log-probs of each pair's chosen and rejected answers, computed once before
training (fp32 transformers forward) and stored in the pair rows, so that training holds only
the policy model. Tokenisation is the training collation's, so the numbers are the ones the
loss would compute on the fly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from ecd_ray.train.collate import (
    CollateConfig,
    collate_pairs,
    concatenated_logprobs,
    pad_token_id,
    tokenize_table_rows,
)

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


@torch.inference_mode()
def reference_logprobs(model: Any, tokenizer: Any, rows: list[dict[str, Any]],
                       cfg: CollateConfig, batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Summed response log-probs of chosen and rejected for each PAIRS row, in order."""
    pairs = tokenize_table_rows(tokenizer, rows, cfg)
    chosen: list[float] = []
    rejected: list[float] = []
    pad = pad_token_id(tokenizer)
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start : start + batch_size], pad)
        c, r, _, _ = concatenated_logprobs(model, batch)
        chosen += c.double().tolist()
        rejected += r.double().tolist()
    return chosen, rejected


class ReferenceWorker:
    """Ray Data actor: adds ``ref_chosen_logp`` / ``ref_rejected_logp`` to PAIRS batches."""

    def __init__(self, model_dir: str, collate: dict[str, Any], threads: int = 1):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # fp32: bf16 log-probs of long answers drift by whole nats.
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.eval()
        self.cfg = CollateConfig(**collate)

    def __call__(self, batch: pa.Table) -> pa.Table:
        for name in ("prompt", "chosen", "rejected"):
            if name not in batch.column_names:
                raise KeyError(f"reference stage needs column '{name}'; input has "
                               f"{batch.column_names}")
        chosen, rejected = reference_logprobs(self.model, self.tokenizer, batch.to_pylist(),
                                              self.cfg)
        batch = batch.drop_columns([c for c in REF_COLUMNS if c in batch.column_names])
        return batch.append_column(REF_COLUMNS[0], pa.array(chosen, pa.float64())).append_column(
            REF_COLUMNS[1], pa.array(rejected, pa.float64()))


def add_reference_logprobs(pairs_dir: Path, out_dir: Path, model_dir: Path,
                           collate: CollateConfig, *, limit: int | None = None,
                           replicas: int = 1, cpus: int = 1) -> int:
    """The reference stage: read PAIRS shards (the first ``limit``), write them back with the
    two ref columns. Each of the ``replicas`` actors uses ``cpus`` cores."""
    import ray

    ds = ray.data.read_parquet(str(pairs_dir), num_cpus=0.25)
    if limit is not None:
        ds = ds.limit(limit)
    ds = ds.map_batches(
        ReferenceWorker,
        fn_constructor_kwargs={"model_dir": str(model_dir), "collate": collate.__dict__,
                               "threads": cpus},
        batch_size=32, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=replicas), num_cpus=cpus,
    )
    ds.write_parquet(str(out_dir), ray_remote_args={"num_cpus": 0.25})
    return sum(1 for _ in out_dir.glob("*.parquet"))
