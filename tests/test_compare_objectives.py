"""A seconds-scale run of benchmarks/compare_objectives.py (tiny model, a few prompts and one
step per objective) and the statistics it reports, checked against independent computations."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_train import separable_pairs

from ecd_ray.config import PACKAGE_DIR, SAMPLE_SEEDS, EvolutionConfig, SeedsConfig
from ecd_ray.curriculum import annotate
from ecd_ray.evaluate.export import export_template_prompts
from ecd_ray.evaluate.stats import intervals, paired_difference
from ecd_ray.evolution import ChainSettings, template_levels
from ecd_ray.schema import PAIRS
from ecd_ray.seeds import iter_seeds

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("compare_objectives",
                                                  ROOT / "benchmarks" / "compare_objectives.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compare_objectives"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_template_levels_match_what_a_chain_evolves() -> None:
    """Evaluation prompts are the levels a template-mode generation run gives the seeds."""
    import asyncio

    from test_evolution import ScriptedEngine

    from ecd_ray.engines.base import Sampling
    from ecd_ray.scheduler import ChainScheduler

    seeds = [s for s, _ in iter_seeds(SeedsConfig(path=str(SAMPLE_SEEDS), limit=20))]
    ev = EvolutionConfig(mode="template")
    rows: list[dict] = []
    settings = ChainSettings.build(ev, rounds=3, seed=5, answer=Sampling())
    asyncio.run(ChainScheduler(ScriptedEngine(lambda r: f"answer {r.request_id}"), settings)
                .run(seeds, lambda c: rows.append(c.to_row())))
    by_id = {r["seed_id"]: r for r in rows}
    for seed in seeds:
        want = [(lvl["instruction"], lvl["requirements"]) for lvl in by_id[seed["seed_id"]][
            "levels"]]
        got = [(lvl["instruction"], lvl["requirements"])
               for lvl in template_levels(seed, ev, rounds=3, global_seed=5)]
        assert got == want


def test_bundled_eval_prompts_are_many_and_disjoint_from_training_seeds(tmp_path: Path) -> None:
    train = {s["instruction"] for s, _ in iter_seeds(SeedsConfig(path=str(SAMPLE_SEEDS)))}
    out = tmp_path / "p.jsonl"
    n = export_template_prompts(SeedsConfig(path=str(PACKAGE_DIR / "data" / "eval_seeds.jsonl")),
                                out, rounds=3, exclude=train)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(rows) >= 300
    assert all(r["instruction_id_list"] for r in rows)
    assert not any(r["prompt"].startswith(t) for r in rows for t in train)


def _details(flags: list[list[bool]]) -> list[dict]:
    return [{"key": str(i), "strict": f, "loose": f} for i, f in enumerate(flags)]


def test_intervals_against_an_independent_bootstrap() -> None:
    rng = np.random.default_rng(1)
    flags = [list(rng.random(rng.integers(1, 4)) < 0.6) for _ in range(300)]
    res = intervals(_details(flags), boots=4000, seed=3)
    p = np.mean([all(f) for f in flags])
    assert res["prompt_level_strict"]["value"] == pytest.approx(p)
    se = np.sqrt(p * (1 - p) / len(flags))  # normal approximation, computed independently
    assert res["prompt_level_strict"]["lo"] == pytest.approx(p - 1.96 * se, abs=0.012)
    assert res["prompt_level_strict"]["hi"] == pytest.approx(p + 1.96 * se, abs=0.012)
    inst = sum(map(sum, flags)) / sum(map(len, flags))
    assert res["instruction_level_loose"]["value"] == pytest.approx(inst)
    assert res["instruction_level_loose"]["lo"] < inst < res["instruction_level_loose"]["hi"]


def test_paired_difference_detects_a_real_gain_and_not_noise() -> None:
    rng = np.random.default_rng(2)
    base = [[bool(x)] for x in rng.random(400) < 0.4]
    better = [[b[0] or bool(x)] for b, x in zip(base, rng.random(400) < 0.2, strict=True)]
    d = paired_difference(_details(base), _details(better))["prompt_level_strict"]
    assert d["value"] > 0.08 and d["significant"] and d["lo"] > 0
    d = paired_difference(_details(base), _details(base))["prompt_level_strict"]
    assert d["value"] == 0 and not d["significant"]
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(_details(base), _details(base[::-1])[:10])


def test_compare_objectives_smoke(tmp_path: Path, tiny_model: Path) -> None:
    pairs = separable_pairs(tmp_path / "pairs", 16)
    rows = pq.read_table(pairs / "pairs.parquet").to_pylist()
    for i, r in enumerate(rows):  # give the pairs a curriculum stage
        r.update(strategy="ecd", chosen_level=1 + i % 3, rejected_level=0, requirements=[])
        annotate(r)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS), pairs / "pairs.parquet")
    mod = _load_benchmark()
    out = tmp_path / "res.json"
    rec = mod.main(["--pairs", str(pairs), "--model", str(tiny_model), "--eval-limit", "6",
                    "--max-pairs", "8", "--max-steps", "1", "--micro-batch-size", "2",
                    "--grad-accum", "1", "--max-length", "64", "--cpus-per-worker", "1",
                    "--engine", "transformers", "--eval-dtype", "float32",
                    "--max-new-tokens", "8", "--work", str(tmp_path / "work"), "--out", str(out),
                    # two of the four objectives: SLiC (trained nowhere else in the suite) and
                    # DPO with the curriculum; SFT and DPO train in tests/test_train.py
                    "--objectives", "slic", "dpo_curriculum"])
    assert set(rec["summary"]) == {"base", "slic", "dpo_curriculum"}
    assert rec["eval"]["prompts"] == 6
    for name, s in rec["summary"].items():
        for m, iv in s["intervals"].items():
            assert iv["lo"] <= iv["value"] <= iv["hi"], (name, m)
    assert all(t["steps"] == 1 for t in rec["training"].values())
    assert out.with_suffix(".md").read_text().count("\n| ") == 4  # header + 3 models
    assert out.with_suffix(".png").stat().st_size > 0
