"""A real run's shards damaged on disk, then the same command: every damaged shard is found by
its recorded SHA-256, removed with a logged reason, and its chains redone, so the resumed run's
pairs equal the uninterrupted run's, row for row, and every seed has exactly one chain.

The damage: one shard truncated, one zero-length, one altered but still valid Parquet (the
seed ids intact, one answer changed: only the hash can tell), one whose hash file is missing (a
stop between the shard's rename and its hash's). The run is put back to what a driver killed
just before its last step leaves (manifest ``running``), so the same command resumes it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from reliability_runs import check_complete, pairs, run_args, table

from ecd_ray.config import load_config
from ecd_ray.pipeline import manifest as mf
from ecd_ray.pipeline.generate import generate


def _ids(shard: Path) -> set[str]:
    return set(pq.read_table(shard, columns=["seed_id"])["seed_id"].to_pylist())


@pytest.mark.slow
def test_damaged_shards_are_redone_on_resume_and_the_pairs_are_unchanged(
        uninterrupted_run: tuple[Path, list[dict[str, Any]]], tiny_model: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    run_dir, expected = uninterrupted_run
    evolutions = run_dir / "evolutions"
    shards = mf.shards(evolutions)
    assert len(shards) >= 5, [p.name for p in shards]
    truncated, empty, altered, unhashed = shards[:4]
    redo = set().union(*(_ids(s) for s in (truncated, empty, altered, unhashed)))
    kept = {s.name: s.read_bytes() for s in shards[4:]}

    whole = truncated.read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    empty.write_bytes(b"")
    t = pq.read_table(altered)
    rows = t.to_pylist()
    rows[0]["levels"][1]["response"] = "an answer the teacher never gave"
    pq.write_table(t.from_pylist(rows, schema=t.schema), altered)
    mf.hash_path(unhashed).unlink()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))

    cfg = load_config(None, run_args(run_dir.parent, tiny_model, run_dir.name))
    with caplog.at_level(logging.WARNING):
        resumed = generate(cfg)
    assert resumed["accounting"]["ok"] and resumed["accounting"]["duplicate_chains"] == 0
    check_complete(run_dir)
    warned = caplog.text
    for shard, reason in ((truncated, "does not match"), (empty, "zero-length"),
                          (altered, "does not match"), (unhashed, "no recorded SHA-256")):
        assert f"removing {shard}: {reason}" in warned.replace("its SHA-256 ", ""), shard
        assert not shard.exists()
    # The intact shards were kept as they were; the damaged ones' seeds were written again.
    assert all((evolutions / name).read_bytes() == data for name, data in kept.items())
    rewritten = {c["seed_id"] for s in mf.shards(evolutions) if s.name not in kept
                 for c in table(s)}
    assert rewritten == redo
    assert all(mf.shard_problem(s) is None for s in mf.shards(evolutions))
    assert pairs(run_dir) == expected
