"""CI's version of the soak (benchmarks/soak.py): 500 seeds through the real ``ecd-ray
generate`` (transformers engine, tiny model), sampled from outside. Every seed is accounted
for once, and the driver's memory and file descriptors do not grow with the work done."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_soak():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


soak = _load_soak()


def test_windows_and_flatness_against_a_hand_computed_series() -> None:
    # 0 seeds until 10 s (start-up), then 2 seeds/s until 70 s, then 1 seed/s until 100 s
    series = [{"t": float(t), "seeds_done": 0 if t <= 10 else
               (2 * (t - 10) if t <= 70 else 120 + (t - 70))} for t in range(0, 101)]
    wins = soak.windows(series, 20.0)
    assert [w["start_s"] for w in wins] == [0, 20, 40, 60, 80]
    assert [w["seeds_per_min"] for w in wins] == [60.0, 120.0, 120.0, 90.0, 60.0]
    # steady: after the first shard (t=11) and before the last seed (t=100)
    assert [w["steady"] for w in wins] == [False, True, True, True, True]
    flat = soak.flatness(wins, 0.10)
    assert flat["steady_windows"] == 4 and flat["flat"] is False
    assert flat["worst_deviation"] == pytest.approx(1 - 60 / 97.5, abs=1e-4)
    assert soak.flatness(wins[1:3], 0.10)["flat"] is True


def test_engine_windows_count_chains_from_two_actors_tokens_across_a_restart(
        tmp_path: Path) -> None:
    """Two actors log cumulative tokens twice a second; actor 1 restarts at 30 s and counts
    from zero again. Hand count: actor 0 makes 10 tok/s throughout; actor 1 makes 20 tok/s
    until 30 s, nothing for 2 s, then 20 tok/s. At 40 tokens a chain, the 0-20 s window
    holds 200 + 400 = 600 tokens = 15 chains (45/min), 20-40 s holds 200 + (200 + 160) = 560
    tokens = 14 chains (42/min)."""
    t0 = 1_000_000.0
    logs = tmp_path / "logs"
    logs.mkdir()
    rows0 = [{"t": t0 + i / 2, "tokens": 5 * i} for i in range(0, 81)]  # 0..40 s
    rows1 = [{"t": t0 + i / 2, "tokens": 10 * i} for i in range(0, 61)]  # 0..30 s
    rows1 += [{"t": t0 + 32 + i / 2, "tokens": 10 * i} for i in range(0, 17)]  # 32..40 s
    for name, rows in (("occupancy-000.jsonl", rows0), ("occupancy-001.jsonl", rows1)):
        (logs / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens = soak.engine_tokens(logs, t0)
    assert tokens[-1] == (40.0, 400 + 600 + 160)
    series = [{"t": float(t), "seeds_done": 0 if t < 1 else 10,
               "cpu_s": {"actors": 0.5 * t, "driver": 0.1 * t, "others": 0.0},
               "sampler_cpu_s": 0.05 * t} for t in range(0, 41)]
    wins = soak.engine_windows(tokens, series, 20.0, tokens_per_chain=40.0)
    assert [w["tokens_per_s"] for w in wins] == [30.0, 28.0]
    assert [w["seeds_per_min"] for w in wins] == [45.0, 42.0]
    assert wins[0]["cores_busy"] == {"actors": 0.5, "driver": 0.1, "others": 0.0,
                                     "sampler": 0.05}
    assert wins[1]["tokens_per_actor_cpu_s"] == 56.0  # 560 tokens / 10 CPU-s


@pytest.mark.slow
def test_500_seed_soak_accounts_every_seed_and_leaks_nothing(tmp_path: Path) -> None:
    data = soak.main(["--seeds", "500", "--window", "5", "--interval", "0.5",
                      "--work", str(tmp_path / "work"), "--out", str(tmp_path / "soak.json")])
    assert (tmp_path / "soak.json").exists() and (tmp_path / "soak.png").exists()
    assert data["chains"] == 500 and data["accounting_ok"] is True
    # throughput from the engine's tokens; the busiest windows saw the actor at work, and no
    # group's CPU ever goes backwards (a worker turning into an actor, an actor exiting)
    assert data["throughput_from"] == "engine tokens (2 Hz)"
    # greedy, the tiny model's first answer decodes to nothing: one 32-token request a chain
    assert data["tokens_per_chain"] == pytest.approx(32, rel=0.05)
    peak = max(w["tokens_per_s"] for w in data["windows"])
    working = [w for w in data["windows"] if w["tokens_per_s"] >= peak / 2]
    assert peak > 0 and all(w["cores_busy"]["actors"] > 0.5 for w in working), working
    assert all(v >= 0 for w in data["windows"] for v in w["cores_busy"].values())
    assert data["series"][-1]["seeds_done"] <= 500
    assert max(s["seeds_done"] for s in data["series"]) > 0  # it was sampled while working
    fds = data["driver_fds"]
    assert fds["last"] <= fds["first"] + 16, fds  # no descriptor per seed or per shard
    assert data["driver_rss"]["peak"] < 2 * 1024 ** 3
    assert data["spilled_bytes_peak"] == 0  # 500 small chains never fill the object store
