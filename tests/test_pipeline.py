"""The real Ray Data generation pipeline on CPU, with a tiny random model, through both engines.

Each test starts a local Ray in-process (``generate`` shuts down only what it started).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest
from conftest import requires_vllm
from test_seeds import GOOD, malformed_jsonl

from ecd_ray.config import SAMPLE_SEEDS, ConfigError, load_config
from ecd_ray.pipeline.generate import generate

ROUNDS = 2


def _run(tmp_path: Path, model: Path, name: str, seeds: Path, *extra: str) -> dict[str, Any]:
    cfg = load_config(None, [
        f"run_name={name}", f"output_dir={tmp_path}", f"seeds.path={seeds}",
        f"teacher.model={model}", f"rounds={ROUNDS}", "teacher.max_new_tokens=12",
        "teacher.min_new_tokens=4", "teacher.batch_size=4", "teacher.num_cpus=1",
        "teacher.temperature=1.0", "ray.num_cpus=2", "scheduler.flush_rows=4",
        # a random tiny model rarely stops on its own: keep its cut answers as pairs
        "pairs.truncated_chosen=keep", *extra,
    ])
    return generate(cfg)


def _table(folder: Path) -> list[dict[str, Any]]:
    return pads.dataset(folder, format="parquet").to_table().to_pylist() if folder.exists() else []


def check_run(run_dir: Path, n_seeds: int) -> list[dict[str, Any]]:
    """Assertions every run must satisfy; returns the pairs."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["accounting"]["ok"], manifest["accounting"]
    chains = {c["seed_id"]: c for c in _table(run_dir / "evolutions")}
    train, heldout = _table(run_dir / "pairs"), _table(run_dir / "heldout")
    pairs = train + heldout
    rejects = _table(run_dir / "rejects")
    assert {p["split"] for p in train} <= {"train"} and {p["split"] for p in heldout} <= {
        "heldout"}
    assert {p["seed_id"] for p in train}.isdisjoint(p["seed_id"] for p in heldout)
    assert len(chains) == n_seeds
    # Every level of every chain is answered; a full chain has rounds + 1 levels.
    for chain in chains.values():
        assert [lvl["level"] for lvl in chain["levels"]] == list(range(chain["num_levels"]))
        assert all(lvl["response"] for lvl in chain["levels"])
        if chain["stop_reason"] == "completed":
            assert chain["num_levels"] == ROUNDS + 1
    # The ECD pairing rule, checked against the chains the pairs came from.
    for p in pairs:
        levels = chains[p["seed_id"]]["levels"]
        k = p["chosen_level"]
        assert p["rejected_level"] == k - 1
        assert p["prompt"] == [{"role": "user", "content": levels[k]["instruction"]}]
        assert p["chosen"] == [{"role": "assistant", "content": levels[k]["response"]}]
        assert p["rejected"] == [{"role": "assistant", "content": levels[k - 1]["response"]}]
        assert p["chosen"][0]["content"] != p["rejected"][0]["content"]
    # Every candidate pair is written or rejected with its reason.
    expected_pairs = sum(max(0, c["num_levels"] - 1) for c in chains.values())
    refused = sum(1 for r in rejects if r["reason"] in (
        "identical_responses", "chosen_fails_requirements", "negative_not_verified",
        "chosen_truncated"))
    assert len(pairs) == expected_pairs - refused
    for p in pairs:  # the pair policy held
        policy = manifest["config"]["pairs"]["policy"]
        assert policy == "all" or p["chosen_missed"] == 0
        assert p["chosen_passes"] == chains[p["seed_id"]]["levels"][p["chosen_level"]]["passes"]
    # Every seed either produced pairs or is in rejects with a reason.
    paired = {p["seed_id"] for p in pairs}
    rejected = {r["seed_id"] for r in rejects if r["reason"]}
    assert set(chains) <= paired | rejected
    return pairs


def check_export_and_evaluator_agree(run_dir: Path, manifest: dict[str, Any],
                                     out: Path) -> None:
    """The evaluator, scoring the teacher's own answers on the exported evolved prompts,
    reproduces the verify stage's teacher pass rates: two code paths, one answer."""
    from ecd_ray.evaluate.export import export_eval
    from ecd_ray.evaluate.ifeval import read_prompts, score

    n = export_eval(run_dir, out, all_seeds=True)
    prompts = read_prompts(out)
    assert len(prompts) == n > 0
    levels = {f"{c['seed_id']}:{lvl['level']}": lvl
              for c in _table(run_dir / "evolutions") for lvl in c["levels"]}
    result = score(prompts, [levels[p.key]["response"] for p in prompts])
    rates = manifest["verification"]["teacher_pass_rate"]
    assert result["instructions"] == sum(r["n"] for r in rates.values())
    for rid, r in rates.items():
        assert result["per_type"][rid]["n"] == r["n"]
        assert result["per_type"][rid]["strict"] == pytest.approx(r["strict"], abs=1e-3)
        assert result["per_type"][rid]["loose"] == pytest.approx(r["loose"], abs=1e-3)


def test_transformers_pipeline_malformed_input_and_determinism(tmp_path: Path,
                                                                tiny_model: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    expected = malformed_jsonl(seeds)
    # float32: bf16 answers can depend on what else is in a batch (see engines/hf.py)
    extra = ["seeds.id_column=id", "teacher.engine=transformers", "teacher.dtype=float32"]
    manifest = _run(tmp_path, tiny_model, "a", seeds, *extra)
    run_dir = tmp_path / "a"
    pairs = check_run(run_dir, len(GOOD))
    seed_rejects = {r["source"]: r["reason"] for r in _table(run_dir / "rejects")
                    if r["stage"] == "seed"}
    assert seed_rejects == expected
    assert manifest["counts"]["seed_rows_read"] == len(GOOD) + len(expected)
    c = manifest["counts"]
    assert c["pairs"] + c["heldout_pairs"] == len(pairs) > 0
    train = _table(run_dir / "pairs")

    # The pairs load with `datasets` in the conversational preference format.
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(run_dir / "pairs" / "*.parquet"),
                               split="train")
    assert ds.num_rows == len(train) == c["pairs"]
    row = ds[0]
    assert row["prompt"][0]["role"] == "user"
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"

    check_export_and_evaluator_agree(run_dir, manifest, tmp_path / "eval.jsonl")

    # Same config and seed, run again: identical pairs.
    _run(tmp_path, tiny_model, "b", seeds, *extra)
    again = check_run(tmp_path / "b", len(GOOD))
    key = lambda p: p["pair_id"]  # noqa: E731
    assert sorted(pairs, key=key) == sorted(again, key=key)


@requires_vllm
def test_vllm_pipeline_isolates_a_too_long_seed(tmp_path: Path, tiny_model: Path) -> None:
    """The async vLLM engine through the whole pipeline. The config check refuses character
    limits that cannot fit ``max_model_len``; a seed within them can still need more tokens
    (emoji: several tokens a character), and that one seed becomes a reject while its batch
    neighbours get pairs. (Continuous batching makes vLLM's outputs depend on what else is in
    flight, so two runs are not compared here; the transformers engine's are, above.)"""
    seeds = tmp_path / "seeds.jsonl"
    rows = [{"instruction": g} for g in GOOD]
    rows.insert(2, {"instruction": "Describe: " + "\U0001F99C" * 400})
    seeds.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    extra = ["teacher.engine=vllm", "teacher.dtype=float32", "teacher.vllm.max_model_len=512",
             "pairs.policy=all"]
    with pytest.raises(ConfigError, match="lower seeds.max_instruction_chars to"):
        _run(tmp_path, tiny_model, "bad", seeds, *extra)  # 8000 characters cannot fit
    manifest = _run(tmp_path, tiny_model, "a", seeds, *extra, "seeds.max_instruction_chars=500",
                    "evolution.max_instruction_chars=1000")
    assert manifest["accounting"]["ok"]
    run_dir = tmp_path / "a"
    rejects = [r for r in _table(run_dir / "rejects") if r["stage"] == "answer"]
    assert [r["reason"] for r in rejects] == ["prompt_too_long"]
    pairs = check_run(run_dir, len(GOOD) + 1)
    assert {p["chosen_model"] for p in pairs} == {str(tiny_model)}
    chains = {c["seed_id"]: c for c in _table(run_dir / "evolutions")}
    assert {p["seed_id"] for p in pairs} == set(chains) - {rejects[0]["seed_id"]}


def test_finished_run_is_not_overwritten(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text(json.dumps({"status": "complete"}))
    with pytest.raises(FileExistsError, match="overwrite=true"):
        _run(tmp_path, tiny_model, "a", SAMPLE_SEEDS, "teacher.engine=transformers")


def test_resume_redoes_only_the_lost_chains(tmp_path: Path, tiny_model: Path) -> None:
    extra = ["teacher.engine=transformers", "seeds.limit=8"]
    _run(tmp_path, tiny_model, "a", SAMPLE_SEEDS, *extra)
    run_dir = tmp_path / "a"
    full = check_run(run_dir, 8)
    shards = sorted((run_dir / "evolutions").glob("*.parquet"))
    assert len(shards) >= 2  # batch_size=4: one shard per batch
    # Simulate a crash while the last shard was being written, before the run finished.
    lost = set(pads.dataset(shards[-1]).to_table(columns=["seed_id"])["seed_id"].to_pylist())
    shards[-1].write_bytes(shards[-1].read_bytes()[:64])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))

    resumed = _run(tmp_path, tiny_model, "a", SAMPLE_SEEDS, *extra)
    assert resumed["accounting"]["ok"] and resumed["accounting"]["duplicate_chains"] == 0
    check_run(run_dir, 8)
    kept = set(pads.dataset(shards[0]).to_table(columns=["seed_id"])["seed_id"].to_pylist())
    assert kept.isdisjoint(lost)
    key = lambda p: p["pair_id"]  # noqa: E731
    assert sorted(check_run(run_dir, 8), key=key) == sorted(full, key=key)


def test_resume_refuses_a_changed_config(tmp_path: Path, tiny_model: Path) -> None:
    run_dir = tmp_path / "a"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"status": "running",
                                                       "config_hash": "something-else"}))
    with pytest.raises(FileExistsError, match="different config"):
        _run(tmp_path, tiny_model, "a", SAMPLE_SEEDS, "teacher.engine=transformers")


def test_mixed_ecd_and_apc_pipeline(tmp_path: Path, tiny_model: Path) -> None:
    """strategy=mixed through the real pipeline: the teacher (rank 2) and a second real
    engine (rank 1, another sampling of the tiny model: ranks are labels here; which model is
    stronger is measured in benchmarks/) in one chain actor; both kinds of pairs in one
    schema, each checked against the chain it came from, and every seed accounted for."""
    extra = ["teacher.engine=transformers", "teacher.dtype=float32", "seeds.limit=10",
             "strategy=mixed", "apc.fraction=0.5", "apc.filter=none", "pairs.policy=all",
             "apc.responders=[{name: teacher, rank: 2, from_teacher: true}, {name: weak, "
             f"rank: 1, model: '{tiny_model}', engine: transformers, dtype: float32, "
             "temperature: 1.5, max_new_tokens: 6, min_new_tokens: 6}]"]
    manifest = _run(tmp_path, tiny_model, "mix", SAMPLE_SEEDS, *extra)
    assert manifest["accounting"]["ok"], manifest["accounting"]
    run_dir = tmp_path / "mix"
    chains = {c["seed_id"]: c for c in _table(run_dir / "evolutions")}
    pairs = _table(run_dir / "pairs") + _table(run_dir / "heldout")
    assert len(chains) == 10
    by = {s: [p for p in pairs if p["strategy"] == s] for s in ("ecd", "apc")}
    assert by["ecd"] and by["apc"]
    assert manifest["counts"]["pairs_per_strategy"] == {
        s: sum(p["split"] == "train" for p in v) for s, v in by.items() if any(
            p["split"] == "train" for p in v)}
    apc_levels = {(sid, lvl["level"]) for sid, c in chains.items() for lvl in c["levels"]
                  if lvl["apc"]}
    for p in by["apc"]:
        lvl = chains[p["seed_id"]]["levels"][p["chosen_level"]]
        assert lvl["apc"] and p["rejected_level"] == p["chosen_level"]
        assert (p["chosen_rank"], p["rejected_rank"]) == (2, 1)
        assert p["chosen"][0]["content"] == lvl["response"]
        weak = [r for r in lvl["responses"] if r["responder"] == "weak"]
        assert p["rejected"][0]["content"] == weak[0]["response"]
        assert weak[0]["completion_tokens"] == 6 and p["rejected_truncated"]
        assert p["prompt"][-1] == {"role": "user", "content": lvl["instruction"]}
    for p in by["ecd"]:
        assert (p["seed_id"], p["chosen_level"]) not in apc_levels
        assert p["rejected_level"] == p["chosen_level"] - 1
    for p in pairs:
        assert 0 < p["difficulty"] <= 1 and p["stage"] in (0, 1, 2)
    # every APC level of a completed chain got the weak answer (none failed here)
    assert sum(len(lvl["responses"]) for c in chains.values() for lvl in c["levels"]) \
        == len(apc_levels)
