"""Seed reading: every bad row is rejected for the right reason, every good row kept."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecd_ray import seeds as seeds_mod
from ecd_ray.config import SAMPLE_SEEDS, SeedsConfig
from ecd_ray.seeds import content_id, iter_seeds, read_seeds

GOOD = [
    "Explain why the sky looks blue during the day.",
    "Write a haiku about a café in the rain.",
    "List three ways to save water at home.",
    "Describe how a bicycle gear works.",
]


def malformed_jsonl(path: Path) -> dict[str, str]:
    """Write good rows mixed with every kind of bad row; return {source: expected reason}."""
    lines: list[bytes] = [
        json.dumps({"id": "g0", "instruction": GOOD[0]}).encode(),
        b'{"id": "bad-json", "instruction": "unterminated',
        json.dumps({"id": "g1", "instruction": GOOD[1]}, ensure_ascii=False).encode(),
        json.dumps({"id": "empty", "instruction": "   "}).encode(),
        json.dumps({"id": "nocol", "prompt": "the column is named differently"}).encode(),
        json.dumps({"id": "g0", "instruction": "Same id as the first row, other text."}).encode(),
        b'{"id": "utf8", "instruction": "bad bytes \xff\xfe here"}',
        json.dumps({"id": "huge", "instruction": "x" * 100_000}).encode(),
        json.dumps({"id": "g2", "instruction": GOOD[2]}).encode(),
        b"[1, 2, 3]",
        b"",
        json.dumps({"id": "dup-text", "instruction": GOOD[2].upper()}).encode(),
        json.dumps({"id": "num", "instruction": 42}).encode(),
        json.dumps({"id": "g3", "instruction": GOOD[3]}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {
        f"{path.name}:2": "invalid_json",
        f"{path.name}:4": "empty_instruction",
        f"{path.name}:5": "missing_column",
        f"{path.name}:6": "duplicate_id",
        f"{path.name}:7": "invalid_utf8",
        f"{path.name}:8": "instruction_too_long",
        f"{path.name}:10": "not_an_object",
        f"{path.name}:12": "duplicate_instruction",
        f"{path.name}:13": "not_a_string",
    }


def test_malformed_rows_each_rejected_for_their_reason(tmp_path: Path) -> None:
    path = tmp_path / "seeds.jsonl"
    expected = malformed_jsonl(path)
    res = read_seeds(SeedsConfig(path=str(path), id_column="id"))
    assert {r["source"]: r["reason"] for r in res.rejects} == expected
    assert [s["instruction"] for s in res.seeds] == GOOD
    assert [s["seed_id"] for s in res.seeds] == ["g0", "g1", "g2", "g3"]
    assert res.rows_read == len(GOOD) + len(expected)  # the blank line is not a row
    huge = next(r for r in res.rejects if r["reason"] == "instruction_too_long")
    assert len(huge["raw"]) < 1000  # rejects keep a preview, not the 100k characters


def test_content_hash_ids_are_stable_and_normalised() -> None:
    assert content_id("Hello  World") == content_id("hello world")
    assert content_id("a") != content_id("b")
    assert len(content_id("x")) == 16


def test_parquet_seeds_with_response_column(tmp_path: Path) -> None:
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({
        "question": ["What is 2+2?", "", "Name a prime number."],
        "answer": ["4", "nothing", None],
    }), path)
    cfg = SeedsConfig(path=str(path), instruction_column="question", response_column="answer")
    res = read_seeds(cfg)
    assert [(s["instruction"], s["response"]) for s in res.seeds] == [
        ("What is 2+2?", "4"), ("Name a prime number.", None)]
    assert [r["reason"] for r in res.rejects] == ["empty_instruction"]


def test_parquet_without_the_instruction_column_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(ValueError, match="no column 'instruction'.*columns are \\['text'\\]"):
        read_seeds(SeedsConfig(path=str(path)))


def test_bundled_sample_seeds_are_clean_and_varied() -> None:
    res = read_seeds(SeedsConfig(path=str(SAMPLE_SEEDS)))
    assert res.rejects == []
    assert len(res.seeds) >= 100
    categories = {json.loads(line)["category"] for line in SAMPLE_SEEDS.read_text().splitlines()}
    assert len(categories) >= 8


def test_limit_counts_bad_rows_too(tmp_path: Path) -> None:
    path = tmp_path / "seeds.jsonl"
    malformed_jsonl(path)
    res = read_seeds(SeedsConfig(path=str(path), limit=3))
    assert res.rows_read == 3 and len(res.seeds) + len(res.rejects) == 3


def test_iter_seeds_yields_one_result_per_row_in_order(tmp_path: Path) -> None:
    path = tmp_path / "seeds.jsonl"
    expected = malformed_jsonl(path)
    out = list(iter_seeds(SeedsConfig(path=str(path), id_column="id")))
    assert all((seed is None) != (bad is None) for seed, bad in out)
    sources = [(seed or bad)["source"] for seed, bad in out]
    assert sources == [f"{path.name}:{n}" for n in range(1, 15) if n != 11]  # 11 is blank
    assert [bad["reason"] for _, bad in out if bad] == list(expected.values())
    details = {bad["reason"]: bad["detail"] for _, bad in out if bad}
    assert details["duplicate_id"] == "an earlier row has the same id"
    assert details["duplicate_instruction"].startswith("an earlier row has the same instruction")


def write_lines(path: Path, n: int) -> None:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"instruction": f"Write {i} short sentences about {i * 7}."}))
            fh.write("\n")


def test_iter_seeds_is_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.jsonl"
    write_lines(path, 100_000)
    pulled = 0
    real = seeds_mod._jsonl_rows

    def counting(p: Path) -> Iterator[Any]:
        nonlocal pulled
        for item in real(p):
            pulled += 1
            yield item

    monkeypatch.setattr(seeds_mod, "_jsonl_rows", counting)
    stream = iter_seeds(SeedsConfig(path=str(path)))
    seed, bad = next(stream)
    assert bad is None and seed["instruction"] == "Write 0 short sentences about 0."
    assert pulled == 1  # one line parsed, not 100k
    stream.close()


def test_streaming_memory_is_a_few_bytes_per_seed(tmp_path: Path) -> None:
    """Peak traced memory of streaming 200k distinct seeds while discarding them: what grows
    with the seeds is the two IdSets of 64-bit hashes (measured ~28 bytes a seed beyond the
    10k-seed baseline, both sets merging at once; the bound leaves margin)."""
    path = tmp_path / "many.jsonl"
    n = 200_000
    write_lines(path, n)

    def peak(limit: int) -> int:
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            kept = sum(seed is not None for seed, _ in iter_seeds(
                SeedsConfig(path=str(path), limit=limit)))
            assert kept == limit
            return tracemalloc.get_traced_memory()[1] - start
        finally:
            tracemalloc.stop()

    baseline = peak(10_000)  # buffers, min-size pending sets: a fixed cost
    per_seed = (peak(n) - baseline) / (n - 10_000)
    assert per_seed < 40, f"{per_seed:.1f} bytes a seed"
