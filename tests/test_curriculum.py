"""Curriculum: the difficulty/stage rule (ecd_ray.curriculum), the stage-ordered batching, and a
2-worker Ray Train run that checks, on each worker, the order in which pairs were trained on
(also across a crash and restart mid-stage)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecd_ray.config import TrainConfig, load_train_config
from ecd_ray.curriculum import annotate, difficulty, stage
from ecd_ray.schema import PAIRS
from ecd_ray.train.collate import bucket_batches, stage_batches
from ecd_ray.train.trainer import FAIL_AT_STEP_ENV, check_stage_column, plan_steps, train

REQ = [{"id": "punctuation:no_comma", "kwargs_json": "{}", "level": 1, "text": "no commas"}]


def _ecd(chosen: int, rejected: int, missed: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"pair_id": "x", "strategy": "ecd", "chosen_level": chosen,
                           "rejected_level": rejected, "requirements": []}
    if missed is not None:
        row.update(requirements=REQ, rejected_missed=missed)
    return row


# --- the rule ------------------------------------------------------------------------------


def test_ecd_gap_alone() -> None:
    assert difficulty(_ecd(3, 2)) == 1.0  # R(k-1): the hard negative
    assert difficulty(_ecd(3, 1)) == 0.5
    assert difficulty(_ecd(4, 1)) == pytest.approx(1 / 3)
    assert [stage(difficulty(_ecd(4, 4 - g))) for g in (1, 2, 3)] == [2, 1, 0]


def test_missed_requirements_make_the_contrast_easier() -> None:
    assert difficulty(_ecd(2, 1, missed=0)) == 1.0  # (1 + 1) / 2
    assert difficulty(_ecd(2, 1, missed=1)) == 0.75  # (1 + 1/2) / 2
    assert difficulty(_ecd(2, 1, missed=2)) == pytest.approx((1 + 1 / 3) / 2)
    assert difficulty(_ecd(3, 1, missed=2)) == pytest.approx((1 / 2 + 1 / 3) / 2)  # 0.4167
    assert [stage(difficulty(_ecd(2, 1, missed=m))) for m in (0, 1, 2)] == [2, 1, 1]
    assert stage(difficulty(_ecd(3, 1, missed=2))) == 0


def test_apc_uses_the_rank_gap_not_the_levels() -> None:
    def apc(chosen: int, rejected: int) -> dict[str, Any]:
        return {"strategy": "apc", "chosen_rank": chosen, "rejected_rank": rejected,
                "chosen_level": 2, "rejected_level": 2, "requirements": []}

    assert difficulty(apc(2, 1)) == 1.0  # neighbouring ranks: hard
    assert difficulty(apc(4, 1)) == pytest.approx(1 / 3)  # strong vs much weaker: easy
    assert stage(difficulty(apc(2, 1))) == 2 and stage(difficulty(apc(4, 1))) == 0
    row = {**apc(2, 1), "requirements": REQ, "rejected_missed": 1}
    assert difficulty(row) == 0.75


def test_stage_edges() -> None:
    assert [stage(d) for d in (0.0, 0.4999, 0.5, 0.7999, 0.8, 1.0)] == [0, 0, 1, 1, 2, 2]
    assert [stage(d, (0.3,)) for d in (0.29, 0.3, 1.0)] == [0, 1, 1]
    assert stage(1.0, ()) == 0


def test_annotate_and_bad_gap() -> None:
    row = annotate(_ecd(3, 1, missed=2))
    assert row["difficulty"] == pytest.approx(0.416667) and row["stage"] == 0
    with pytest.raises(ValueError, match="gap 0"):
        difficulty(_ecd(2, 2))
    with pytest.raises(ValueError, match="gap -1"):
        difficulty({"strategy": "apc", "chosen_rank": 1, "rejected_rank": 2})


# --- stage-ordered batching (pure) --------------------------------------------------------


def test_stage_batches_order_coverage_and_seeded_shuffle() -> None:
    n = 300
    stages = [(i * 7) % 4 for i in range(n)]  # stages interleaved in input order
    lengths = [(i * 37) % 101 for i in range(n)]
    batches = stage_batches(stages, lengths, 4, window=3, seed=11)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))  # every item exactly once
    per_batch = [{stages[i] for i in b} for b in batches]
    assert all(len(s) == 1 for s in per_batch)  # no batch mixes stages
    order = [next(iter(s)) for s in per_batch]
    assert order == sorted(order)  # the stage never goes back
    assert stage_batches(stages, lengths, 4, window=3, seed=11) == batches  # deterministic
    other = stage_batches(stages, lengths, 4, window=3, seed=12)
    assert other != batches and sorted(i for b in other for i in b) == list(range(n))
    for s in range(4):  # the shuffle moves batches within each stage
        mine = [b for b in batches if stages[b[0]] == s]
        theirs = [b for b in other if stages[b[0]] == s]
        assert mine != theirs
        assert sorted(map(sorted, mine)) == sorted(map(sorted, theirs))
    # within a stage it is plain length bucketing: each batch is a run of similar lengths
    items = [i for i in range(n) if stages[i] == 2]
    assert len([b for b in batches if stages[b[0]] == 2]) == len(
        bucket_batches([lengths[i] for i in items], 4, window=3))


def test_stage_batches_one_stage_and_mismatch() -> None:
    batches = stage_batches([5] * 10, list(range(10)), 3, window=2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(10))
    with pytest.raises(ValueError, match="3 stages for 2 lengths"):
        stage_batches([0, 0, 0], [1, 2], 2)


def test_plan_steps_counts_each_stage_split_on_its_own() -> None:
    cfg = TrainConfig(num_workers=2, micro_batch_size=1, grad_accum=1)
    assert plan_steps(cfg, 6) == (3, 3)
    # 3 + 3 pairs: 1 + 1 per worker (each stage drops its odd pair), not 6 // 2
    assert plan_steps(cfg, 6, {0: 3, 1: 3}) == (2, 2)
    with pytest.raises(ValueError, match="too few"):
        plan_steps(cfg, 3, {0: 1, 1: 1, 2: 1})


# --- pairs for the training runs ---------------------------------------------------------

WORDS = ["river", "castle", "apple", "window", "forest", "music", "garden", "winter"]
KINDS = [(3, 1, 2), (2, 1, 1), (2, 1, 0)]  # chosen level, rejected level, missed -> stage 0/1/2


def staged_pairs(path: Path, n: int = 48, stage_column: bool = True) -> dict[str, int]:
    """``n`` learnable pairs whose stage cycles 0, 1, 2 in file order and whose prompts vary in
    length; returns pair_id -> stage."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        chosen, rejected, missed = KINDS[i % 3]
        rows.append(annotate({
            "pair_id": f"p{i:02d}", "seed_id": f"s{i}", "strategy": "ecd",
            "chosen_level": chosen, "rejected_level": rejected, "requirements": REQ,
            "rejected_missed": missed,
            "prompt": [{"role": "user", "content": f"Tell me about the {w} " * (1 + i % 5)}],
            "chosen": [{"role": "assistant", "content": "yes yes yes yes"}],
            "rejected": [{"role": "assistant", "content": f"no {w} no {w}"}],
        }))
    table = pa.Table.from_pylist(rows, schema=PAIRS)
    if not stage_column:
        table = table.drop_columns(["stage"])
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path / "pairs.parquet")
    return {r["pair_id"]: r["stage"] for r in rows}


def _cfg(tmp_path: Path, model: Path, pairs: Path, *extra: str) -> TrainConfig:
    return load_train_config(None, [
        f"output_dir={tmp_path}", f"pairs={pairs}", f"model={model}", "num_workers=2",
        "micro_batch_size=2", "grad_accum=2", "lr=0.002", "beta=0.5", "max_length=64",
        "max_prompt_tokens=48", "param_persistence_threshold=0", "schedule=constant",
        "ray.num_cpus=4", "curriculum=true", *extra])


def test_curriculum_refuses_pairs_without_a_stage_column(tmp_path: Path) -> None:
    staged_pairs(tmp_path / "old", 8, stage_column=False)
    with pytest.raises(ValueError, match="'stage' column.*curriculum=false"):
        check_stage_column(tmp_path / "old")
    cfg = TrainConfig(pairs=str(tmp_path / "old"), output_dir=str(tmp_path), curriculum=True)
    with pytest.raises(ValueError, match="pairs.parquet has none"):
        train(cfg)  # before Ray starts or the run folder exists
    assert not cfg.run_dir.exists()


def test_curriculum_refuses_pairs_with_empty_stages(tmp_path: Path) -> None:
    """Pairs written with today's schema but without the rule: the column is there, all null."""
    staged_pairs(tmp_path / "pairs", 8)
    table = pq.read_table(tmp_path / "pairs" / "pairs.parquet")
    table = table.set_column(table.schema.get_field_index("stage"), "stage",
                             pa.nulls(len(table), pa.int32()))
    pq.write_table(table, tmp_path / "pairs" / "pairs.parquet")
    cfg = TrainConfig(pairs=str(tmp_path / "pairs"), output_dir=str(tmp_path), curriculum=True)
    with pytest.raises(ValueError, match=r"8 pairs of .* have it empty \(null\).*false"):
        train(cfg)  # before the reference stage or Ray
    assert not cfg.run_dir.exists()


def _data_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_workers_train_each_stage_in_order_and_resume_mid_stage(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """48 pairs, 16 per stage, interleaved in the file; 2 workers x 2 pairs x 2 accumulation:
    each worker trains on 8 pairs (4 micro-batches, 2 steps) of each stage. The run crashes
    at step 5 (stage 2) and Ray Train restarts it from the step-3 checkpoint, mid stage 1."""
    stages = staged_pairs(tmp_path / "pairs", 48)
    assert Counter(stages.values()) == {0: 16, 1: 16, 2: 16}
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")
    summary = train(_cfg(tmp_path, tiny_model, tmp_path / "pairs", "run_name=c",
                         "checkpoint_every=3", "max_failures=1", "bucket_window=2",
                         "data_log=true"))
    assert summary["steps"] == 6
    metrics = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").open()]
    assert [(m["step"], m["stage"]) for m in metrics] == [
        (1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (4, 1), (5, 2), (6, 2)]
    trained: list[str] = []
    by_rank = []
    for rank in (0, 1):
        lines = _data_log(tmp_path / "c" / "data_log" / f"rank{rank}.jsonl")
        micro = [x["micro"] for x in lines]
        restart = next(i for i in range(1, len(micro)) if micro[i] <= micro[i - 1])
        first, second = lines[:restart], lines[restart:]
        assert [x["micro"] for x in first] == list(range(10))  # steps 1-5, then the crash
        assert [x["micro"] for x in second] == list(range(6, 12))  # resumed after step 3
        for attempt in (first, second):
            order = [x["stage"] for x in attempt]
            assert order == sorted(order), f"rank {rank} went back a stage: {order}"
        # the restart replays exactly the micro-batches it had consumed after step 3
        assert [x["pair_ids"] for x in second[:4]] == [x["pair_ids"] for x in first[6:10]]
        final = first[:6] + second
        for x in final:  # every pair is of the stage its micro-batch says
            assert {stages[p] for p in x["pair_ids"]} == {x["stage"]}
        assert [x["stage"] for x in final] == [0] * 4 + [1] * 4 + [2] * 4
        by_rank.append([x["stage"] for x in final])
        trained += [p for x in final for p in x["pair_ids"]]
    assert by_rank[0] == by_rank[1]  # the workers change stage at the same step
    assert sorted(trained) == sorted(stages)  # each pair once, over both workers
