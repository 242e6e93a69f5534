"""The manifest's streamed counts, accounting and verification on a small hand-built run."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecd_ray.config import RunConfig
from ecd_ray.pipeline import manifest as mf
from ecd_ray.schema import EVOLUTIONS, PAIRS, REJECTS, reject


def level(n: int, reqs: list[str], passes: list[bool] | None,
          loose: list[bool] | None, tokens: int | None) -> dict[str, Any]:
    return {
        "level": n, "instruction": f"instruction {n}", "operation": "seed" if n == 0 else "add",
        "added_text": None,
        "requirements": [{"id": r, "kwargs_json": "{}", "level": n, "text": r} for r in reqs],
        "response": "an answer " * 50, "response_source": "teacher", "model": "m",
        "prompt_tokens": 10, "completion_tokens": tokens, "finish_reason": "stop",
        "passes": passes, "passes_loose": loose,
    }


def chain(seed_id: str, levels: list[dict[str, Any]], stop: str) -> dict[str, Any]:
    return {"seed_id": seed_id, "source": f"seeds.jsonl:{seed_id}", "levels": levels,
            "num_levels": len(levels), "stop_reason": stop, "rejected_attempts": [],
            "sampling_json": "{}", "worker": "node:1"}


def pair(seed_id: str, chosen: int, verified: bool, missed: int, reqs: list[str],
         split: str = "train") -> dict[str, Any]:
    msg = [{"role": "user", "content": "x"}]
    return {
        "pair_id": f"{seed_id}-{chosen}", "prompt": msg, "chosen": msg, "rejected": msg,
        "seed_id": seed_id, "strategy": "ecd", "chosen_level": chosen,
        "rejected_level": chosen - 1, "operation": "add",
        "requirements": [{"id": r, "kwargs_json": "{}", "level": 1, "text": r} for r in reqs],
        "chosen_model": "m", "rejected_model": "m", "chosen_finish_reason": "stop",
        "rejected_finish_reason": "stop", "chosen_passes": [True] * len(reqs),
        "rejected_passes": [False] * len(reqs), "chosen_missed": 0, "rejected_missed": missed,
        "hard_negative_verified": verified, "split": split,
        "difficulty": 1.0 / (1 + missed), "stage": 1 if missed else 2,
    }


def put(rows: list[dict[str, Any]], sch: pa.Schema, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=sch), path)
    return path


S4 = [level(0, [], [], [], 20), level(1, ["case"], None, None, 30)]  # level 1 never verified


def build_run(run_dir: Path) -> None:
    """Six valid seeds s1..s6 and two bad seed rows.

    s1: 3 levels, 2 train pairs.  s2: 2 levels, 1 heldout pair.  s3: 1 level, a pair reject.
    s4: 2 levels, 1 train pair, and its chain written twice.  s5: 1 level, nothing else
    (unaccounted).  s6: no chain (missing).
    """
    put([
        chain("s1", [level(0, [], [], [], 100), level(1, ["len"], [True], [True], 110),
                     level(2, ["len", "json"], [True, False], [True, True], 120)], "completed"),
        chain("s2", [level(0, [], [], [], 50), level(1, ["json"], [False], [True], None)],
              "completed"),
        chain("s3", [level(0, [], [], [], 7)], "evolve:too_similar"),
    ], EVOLUTIONS, run_dir / "evolutions" / "a.parquet")
    put([chain("s4", S4, "completed"), chain("s5", [level(0, [], [], [], 3)], "answer:length")],
        EVOLUTIONS, run_dir / "evolutions" / "sub" / "b.parquet")
    put([chain("s4", S4, "completed")], EVOLUTIONS, run_dir / "evolutions" / "c.parquet")
    put([pair("s1", 1, True, 1, ["len"]), pair("s1", 2, False, 0, ["len", "json"]),
         pair("s4", 1, True, 1, [])], PAIRS, run_dir / "pairs" / "p.parquet")
    put([pair("s2", 1, True, 1, ["json"], split="heldout")], PAIRS,
        run_dir / "heldout" / "h.parquet")
    put([reject("seed", "invalid_json", "bad", source="seeds.jsonl:9"),
         reject("seed", "duplicate_id", "dup", seed_id="s1", source="seeds.jsonl:10")],
        REJECTS, run_dir / "rejects" / "seeds.parquet")
    put([reject("pair", "no_pairs", "none", seed_id="s3")], REJECTS,
        run_dir / "rejects" / "chains" / "r.parquet")


@pytest.fixture
def run(tmp_path: Path) -> RunConfig:
    cfg = RunConfig(output_dir=str(tmp_path), run_name="run")
    build_run(cfg.run_dir)
    return cfg


def test_accounting_counts_by_hand(run: RunConfig) -> None:
    assert mf.accounting(run.run_dir, n_valid=6) == {
        "chains": 6,  # s1 s2 s3 s4 s5 + s4 again
        "duplicate_chains": 1,
        "seeds_with_pairs": 3,  # s1 s4 (train), s2 (heldout)
        "seeds_without_pairs": 2,  # s3 s5
        "missing_chains": 1,  # s6
        "unaccounted_seed_ids": ["s5"],  # s3 has a reject
        "ok": False,
    }


def test_accounting_ok_when_everything_is_accounted_for(run: RunConfig) -> None:
    run_dir = run.run_dir
    (run_dir / "evolutions" / "c.parquet").unlink()  # no duplicate
    put([reject("answer", "length", "cut", seed_id="s5")], REJECTS,
        run_dir / "rejects" / "chains" / "r2.parquet")
    acct = mf.accounting(run_dir, n_valid=5)
    assert acct["ok"] and acct["unaccounted_seed_ids"] == [] and acct["chains"] == 5


def test_unaccounted_ids_are_capped_at_fifty_smallest(tmp_path: Path) -> None:
    ids = [f"u{i:03d}" for i in range(120)]
    put([chain(i, [level(0, [], [], [], 1)], "completed") for i in reversed(ids)], EVOLUTIONS,
        tmp_path / "evolutions" / "x.parquet")
    acct = mf.accounting(tmp_path, n_valid=120)
    assert acct["unaccounted_seed_ids"] == ids[:50]
    assert acct["seeds_without_pairs"] == 120 and not acct["ok"]


def test_verification_by_hand(run: RunConfig) -> None:
    assert mf.verification(run.run_dir) == {
        "pairs": 4,  # 3 train + 1 heldout
        "verified_hard_negatives": 3,
        "verified_share": 0.75,
        "pairs_with_checkable_requirements": 2,  # train pairs with requirements
        "rejected_missed_distribution": {0: 1, 1: 3},
        # len: s1 L1, s1 L2 (strict and loose pass); json: s1 L2 and s2 L1 (loose only);
        # case (s4 L1, twice) has no verdicts, so it is not counted
        "teacher_pass_rate": {
            "json": {"n": 2, "strict": 0.0, "loose": 1.0},
            "len": {"n": 2, "strict": 1.0, "loose": 1.0},
        },
    }


def test_finish_counts_and_extra(run: RunConfig) -> None:
    out = mf.finish(run, rows_read=8, n_valid=6, started=0.0,
                    extra={"restarts": 2, "counts": "overridden by the computed counts"})
    assert out["status"] == "complete" and out["restarts"] == 2
    assert out["counts"] == {
        "seed_rows_read": 8,
        "seeds_valid": 6,
        "seeds_rejected": 2,
        "chains": 6,
        "chain_stop_reasons": {"completed": 4, "evolve:too_similar": 1, "answer:length": 1},
        "answered_levels_per_chain": {1: 2, 2: 3, 3: 1},
        "pairs": 3,
        "pairs_per_chosen_level": {1: 2, 2: 1},
        "pairs_per_strategy": {"ecd": 3},
        "pairs_per_stage": {1: 2, 2: 1},  # missed 1, 1 and 0
        "heldout_pairs": 1,
        "rejects": {"seed:invalid_json": 1, "seed:duplicate_id": 1, "pair:no_pairs": 1},
        # s1 100+110+120, s2 50 (+ a null), s3 7, s4 20+30 twice, s5 3
        "completion_tokens": 330 + 50 + 7 + 100 + 3,
    }
    assert out["accounting"]["unaccounted_seed_ids"] == ["s5"] and not out["accounting"]["ok"]
    assert out["verification"]["pairs"] == 4
    assert out["verification"]["teacher_pass_rate"] == mf.teacher_pass_rates(run.run_dir)
    on_disk = mf.read(run.run_dir)
    assert on_disk is not None and on_disk["counts"]["chains"] == 6
    assert on_disk["restarts"] == 2 and on_disk["config_hash"] == mf.config_hash(run)
    assert [s["path"] for s in on_disk["shards"]] == [
        "evolutions/a.parquet", "evolutions/c.parquet", "evolutions/sub/b.parquet",
        "pairs/p.parquet", "heldout/h.parquet", "rejects/chains/r.parquet",
        "rejects/seeds.parquet"]
    assert [s["rows"] for s in on_disk["shards"]] == [3, 1, 2, 3, 1, 1, 2]


def test_shard_list_hashes_the_file_bytes(run: RunConfig) -> None:
    for entry in mf._shard_list(run.run_dir):
        path = run.run_dir / entry["path"]
        expected = hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["sha256"] == expected
        assert mf._sha256(path, chunk=7) == expected  # many small chunks, same digest


def test_done_seed_ids_removes_broken_shards(
    run: RunConfig, caplog: pytest.LogCaptureFixture
) -> None:
    folder = run.run_dir / "evolutions"
    for shard in mf.shards(folder):
        mf.record_hash(shard)  # as chain actors do (tests/reliability checks the hashes)
    whole = put([chain("s6", [level(0, [], [], [], 1)], "completed")], EVOLUTIONS,
                folder / "d.parquet").read_bytes()
    (folder / "d.parquet").write_bytes(whole[: len(whole) // 2])  # truncated
    (folder / "e.parquet").write_bytes(b"")  # zero-length
    (folder / "f.parquet.tmp").write_bytes(whole)  # a write that never got its final name
    with caplog.at_level(logging.WARNING):
        done = mf.done_seed_ids(folder)
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == [
        ".a.parquet.sha256", ".b.parquet.sha256", ".c.parquet.sha256",
        "a.parquet", "b.parquet", "c.parquet"]
    assert len(done) == 5 and all(f"s{i}" in done for i in range(1, 6)) and "s6" not in done
    logged = caplog.text
    assert "d.parquet" in logged and "e.parquet" in logged and "f.parquet.tmp" in logged
    assert mf.accounting(run.run_dir, n_valid=6)["chains"] == 6  # the broken ones are gone
    assert len(mf.done_seed_ids(run.run_dir / "nothing-here")) == 0


def test_manifest_json_round_trip(run: RunConfig) -> None:
    mf.write(run, status="running", extra={"started": 1.0})
    data = json.loads((run.run_dir / "manifest.json").read_text())
    assert data["status"] == "running" and data["started"] == 1.0
    assert mf.shards(run.run_dir / "missing") == []
