"""Evaluation prompts as IFEval JSONL.

``export_eval`` (``ecd-ray export-eval``): a generation run's held-out evolved prompts.
Held-out seeds (``pairs.holdout_fraction``, a stable hash split) never reach ``pairs/``, so a
model trained on the run's pairs has not seen these prompts.

``export_template_prompts``: prompts evolved in template mode from a separate seed file (the
bundled ``eval_seeds.jsonl``), with no teacher at all: the levels a generation run would give
those seeds, so a larger held-out set costs no generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads

from ecd_ray.config import EvolutionConfig, SeedsConfig
from ecd_ray.pairs import is_heldout
from ecd_ray.pipeline import manifest as mf


def _prompt_row(seed_id: str, lvl: dict) -> dict:
    return {"key": f"{seed_id}:{lvl['level']}", "prompt": lvl["instruction"],
            "instruction_id_list": [r["id"] for r in lvl["requirements"]],
            "kwargs": [json.loads(r["kwargs_json"]) for r in lvl["requirements"]]}


def export_template_prompts(seeds: SeedsConfig, out: Path, *, rounds: int = 3,
                            global_seed: int = 0, evolution: EvolutionConfig | None = None,
                            exclude: set[str] | None = None) -> int:
    """Write one prompt per template-evolved level (k >= 1) with checkable requirements of
    every valid seed in ``seeds`` (minus the instructions in ``exclude``, normalised);
    returns the count. Invalid seed rows are skipped (they have no prompt)."""
    from ecd_ray.evolution import template_levels
    from ecd_ray.seeds import iter_seeds, normalize

    evolution = evolution or EvolutionConfig(mode="template")
    exclude = {normalize(t) for t in (exclude or set())}
    n = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for seed, _ in iter_seeds(seeds):
            if seed is None or normalize(seed["instruction"]) in exclude:
                continue
            for lvl in template_levels(seed, evolution, rounds=rounds,
                                       global_seed=global_seed)[1:]:
                if lvl["requirements"]:
                    fh.write(json.dumps(_prompt_row(seed["seed_id"], lvl),
                                        ensure_ascii=False) + "\n")
                    n += 1
    return n


def export_eval(run_dir: Path, out: Path, *, all_seeds: bool = False) -> int:
    """Write one prompt per evolved level (k >= 1) with checkable requirements; returns count."""
    manifest = mf.read(run_dir)
    if manifest is None or manifest.get("status") != "complete":
        raise FileNotFoundError(f"{run_dir} holds no complete generation run (manifest.json)")
    cfg = manifest["config"]
    fraction, seed = cfg["pairs"]["holdout_fraction"], cfg["seed"]
    if fraction == 0 and not all_seeds:
        raise ValueError(f"{run_dir} was generated with pairs.holdout_fraction=0: no held-out "
                         "seeds; pass --all-seeds to export every seed's prompts anyway")
    table = pads.dataset(run_dir / "evolutions", format="parquet").to_table(
        columns=["seed_id", "levels"])
    n = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for chain in table.to_pylist():
            if not all_seeds and not is_heldout(chain["seed_id"], fraction, seed):
                continue
            for lvl in chain["levels"][1:]:
                if not lvl["requirements"]:
                    continue
                fh.write(json.dumps(_prompt_row(chain["seed_id"], lvl),
                                    ensure_ascii=False) + "\n")
                n += 1
    return n
