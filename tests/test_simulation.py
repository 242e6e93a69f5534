"""The scheduling simulation (benchmarks/simulate_scheduling.py): it drives the real
ChainScheduler, and its virtual clock is right where the answer is known by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location(
        "simulate_scheduling", ROOT / "benchmarks" / "simulate_scheduling.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


SEEDS, SLOTS, ROUNDS = 300, 32, 3
LENGTHS = [10, 40, 90, 160]


def test_drives_the_real_scheduler_to_the_end(sim):
    for mode, kw in (("continuous", {}), ("lockstep", {"batch_size": 16})):
        res = sim.simulate(mode, mode=mode, seeds=SEEDS, lengths=LENGTHS, rounds=ROUNDS,
                           max_num_seqs=SLOTS, **kw)
        # every chain completed all its levels: one answer request per level
        assert res.chains == SEEDS
        assert res.levels_per_chain == {ROUNDS + 1: SEEDS}
        assert res.stop_reasons == {"completed": SEEDS}
        assert res.requests == SEEDS * (ROUNDS + 1)
        assert res.tokens <= res.virtual_steps * SLOTS
        # the occupancy trace integrates to the tokens generated
        pts = [*res.trace, (res.virtual_steps, 0)]
        steps = zip(pts, pts[1:], strict=False)
        assert sum(b * (t1 - t0) for (t0, b), (t1, _) in steps) == res.tokens
        assert all(0 <= b <= SLOTS for _, b in res.trace)


def test_continuous_keeps_the_slots_busier_than_lockstep_16(sim):
    cont = sim.simulate("c", mode="continuous", seeds=SEEDS, lengths=LENGTHS, rounds=ROUNDS,
                        max_num_seqs=SLOTS)
    lock = sim.simulate("l", mode="lockstep", seeds=SEEDS, lengths=LENGTHS, rounds=ROUNDS,
                        max_num_seqs=SLOTS, batch_size=16)
    assert cont.max_chains == 2 * SLOTS  # the scheduler's default
    assert cont.tokens == lock.tokens  # same requests, same drawn lengths
    assert cont.busy_fraction > 0.8 > 0.5 > lock.busy_fraction
    assert cont.virtual_steps < lock.virtual_steps


@pytest.mark.parametrize("length,batch", [(7, 20), (25, 30), (13, 1), (40, 12)])
def test_lockstep_virtual_time_by_hand(sim, length, batch):
    # Equal lengths, batch <= slots, batch divides the seeds: each batch runs its rounds+1
    # answer steps one after the other, each `length` engine steps long.
    assert SEEDS % batch == 0 and batch <= SLOTS
    expected = (SEEDS // batch) * (ROUNDS + 1) * length
    res = sim.simulate("l", mode="lockstep", seeds=SEEDS, lengths=[length], rounds=ROUNDS,
                       max_num_seqs=SLOTS, batch_size=batch)
    assert res.virtual_steps == expected
    assert res.busy_fraction == pytest.approx(batch / SLOTS)
    assert res.tokens == SEEDS * (ROUNDS + 1) * length


def test_lengths_are_drawn_per_request_id(sim):
    eng = sim.SimEngine(lengths=list(range(1, 1000)), seed=3)
    req = sim.ChatRequest("answer:x:0", [], sim.Sampling(max_new_tokens=5000))
    again = sim.SimEngine(lengths=list(range(1, 1000)), seed=3)
    assert eng.length_of(req) == again.length_of(req)
    other = sim.ChatRequest("answer:x:1", [], sim.Sampling(max_new_tokens=5000))
    draws = {sim.SimEngine(lengths=list(range(1, 1000)), seed=s).length_of(other)
             for s in range(5)}
    assert len(draws) > 1


def test_lengths_from_json(sim, tmp_path):
    (tmp_path / "a.json").write_text("[3, 0, 5]")
    (tmp_path / "b.json").write_text('{"model": "m", "lengths": [4, 6]}')
    assert sim.lengths_from(tmp_path / "a.json") == [3, 5]
    assert sim.lengths_from(tmp_path / "b.json") == [4, 6]
