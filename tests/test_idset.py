"""IdSet: behaves like a Python set of strings, in a few bytes a key."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecd_ray.idset import IdSet, key_hash


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.text(max_size=6)), max_size=200),
    probes=st.lists(st.text(max_size=6), max_size=30),
)
def test_matches_a_python_set_across_many_merges(
    ops: list[tuple[bool, str]], probes: list[str]
) -> None:
    ids = IdSet(min_pending=3, max_pending=7)  # tiny thresholds: a merge every few adds
    ref: set[str] = set()
    for many, key in ops:
        if many:
            assert ids.add_many([key, key]).tolist() == [key not in ref, False]
        else:
            assert ids.add(key) == (key not in ref)
        ref.add(key)
        assert len(ids) == len(ref)
    for key in probes + [k for _, k in ops]:
        assert (key in ids) == (key in ref)
    assert ids.contains_many(probes).tolist() == [p in ref for p in probes]


def test_random_keys_against_a_set_through_the_threshold() -> None:
    rng = random.Random(7)
    ids = IdSet(min_pending=64, max_pending=1000)
    ref: set[str] = set()
    for _ in range(20_000):
        key = f"seed-{rng.randrange(15_000)}"
        assert ids.add(key) == (key not in ref)
        ref.add(key)
    assert len(ids) == len(ref)
    assert len(ids._pending) <= 1000  # merged repeatedly, never more pending than the cap
    merged = ids._merged
    assert np.all(merged[1:] > merged[:-1])  # sorted, no duplicates
    probes = [f"seed-{i}" for i in range(20_000)]
    assert [p in ids for p in probes] == [p in ref for p in probes]
    assert ids.contains_many(probes).tolist() == [p in ref for p in probes]


def test_bulk_update_counts_new_keys_and_matches_add() -> None:
    ids = IdSet(min_pending=16, max_pending=256)
    keys = [f"k{i % 5000}" for i in range(12_000)]  # repeats within and across chunks
    assert ids.update(keys) == 5000
    assert ids.update(keys[:100] + ["fresh"]) == 1
    assert len(ids) == 5001
    assert all(f"k{i}" in ids for i in range(5000))
    assert "k5000" not in ids and "fresh" in ids
    mask = ids.add_many(["a", "k1", "a", "b"])
    assert mask.tolist() == [True, False, False, True]


def test_constructor_keys_non_strings_and_bad_thresholds() -> None:
    ids = IdSet(["x", "y", "x"])
    assert len(ids) == 2 and "x" in ids and "z" not in ids
    assert 42 not in ids and None not in ids
    assert key_hash("x") == key_hash("x") and key_hash("x") != key_hash("y")
    assert 0 <= key_hash("é") < 2**64
    with pytest.raises(ValueError):
        IdSet(min_pending=10, max_pending=5)


def test_memory_per_key_at_200k_keys() -> None:
    ids = IdSet()
    worst = 0.0
    for i in range(1, 200_001):
        ids.add(f"seed-{i:08d}")
        if i >= 100_000 and i % 5_000 == 0:
            worst = max(worst, ids.nbytes / i)
    per_key = ids.nbytes / len(ids)
    assert len(ids) == 200_000
    assert per_key < 24, per_key
    assert worst < 24, worst  # not only at the count measured, between merges too
