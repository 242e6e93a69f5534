"""benchmarks/bench_train.py: a seconds-scale run of all four modes (tiny model, 8 pairs, 2
steps, max_length 64) and its pure helpers, checked against independent computations."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecd_ray.schema import PAIRS

ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2)


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_train",
                                                  ROOT / "benchmarks" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load_benchmark()


def chat_pairs(n: int, start: int = 0) -> list[dict]:
    """PAIRS rows like a generation run's: a system prompt, a user turn, one answer each."""
    rows = []
    for i in range(start, start + n):
        rows.append({
            "pair_id": f"p{i}", "seed_id": f"s{i}", "strategy": "ecd",
            "prompt": [{"role": "system", "content": "You are a helpful assistant."},
                       {"role": "user", "content": f"Give {i % 3 + 1} facts about {i * 7}."}],
            "chosen": [{"role": "assistant",
                        "content": " ".join(["It is a multiple of seven."] * (i % 3 + 1))}],
            "rejected": [{"role": "assistant", "content": "I do not know" + "." * (i % 4)}],
        })
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS), path)
    return path


# ---------------------------------------------------------------------------------------------
# The smoke run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    pytest.importorskip("trl")
    root = tmp_path_factory.mktemp("bench_train")
    pairs = root / "pairs"
    _write(pairs / "a.parquet", chat_pairs(5))
    _write(pairs / "b.parquet", chat_pairs(7, start=5))  # the first 8 span two shards
    out = root / "train_vs_trl.json"
    t = time.perf_counter()
    record = bench.main([
        "--pairs", str(pairs), "--model", str(tiny_model), "--n-pairs", "8", "--steps", "2",
        "--global-batch", "8", "--micro-batch-size", "4", "--max-length", "64",
        "--lr", "1e-3", "--work", str(root / "work"), "--out", str(out)])
    record["_test"] = {"seconds": time.perf_counter() - t, "out": out, "model": tiny_model,
                       "work": root / "work"}
    print(f"bench_train smoke run: {record['_test']['seconds']:.0f} s")
    return record


@pytest.mark.slow
def test_smoke_run_writes_the_json_and_png(smoke: dict) -> None:
    out = smoke["_test"]["out"]
    on_disk = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert set(on_disk["runs"]) == set(bench.MODES)
    assert on_disk["cpu"]["model"] and isinstance(on_disk["cpu"]["flags"], list)
    assert on_disk["versions"]["trl"] == "1.16.0" and "torch" in on_disk["versions"]
    s = on_disk["settings"]
    assert s["pair_ids"] == [f"p{i}" for i in range(8)]
    assert (s["steps"], s["global_batch"], s["max_length"]) == (2, 8, 64)
    assert s["trl_order_from"] == "ecd_precomputed" and s["trl_micro_batches_equal_ecd"]
    for mode, run in on_disk["runs"].items():
        assert run["ok"], (mode, run.get("log_tail"))
        assert [st["step"] for st in run["steps"]] == [1, 2]
        for key in ("tokens_per_s", "mean_step_time_s", "wall_s", "peak_tree_rss_gib",
                    "peak_training_process_rss_gib"):
            assert run[key] > 0, (mode, key)
        assert run["wall_s"] > run["steps_time_s"] + run["reference_s"]
        assert run["rss"]["peak_tree_rss_gib"] >= run["rss"]["peak_training_process_rss_gib"]
        assert run["rss"]["samples"] >= 4 and run["rss"]["series"]
        assert not run["left_running"]
    for mode in ("trl", "trl_precompute"):
        run = on_disk["runs"][mode]
        assert run["rss"]["training_processes"] == 1
        assert run["param_dtype"] == "torch.float32" and run["gradient_checkpointing"] is False
        assert run["trl_config"]["precompute_ref_log_probs"] == (mode == "trl_precompute")
    assert on_disk["runs"]["trl_precompute"]["reference_s"] > 0
    for mode in ("ecd_precomputed", "ecd_resident"):
        run = on_disk["runs"][mode]
        # the default: ZeRO-3 over two Ray Train workers, both found and marked as training
        assert run["config"]["strategy"] == "deepspeed" and run["config"]["num_workers"] == 2
        assert run["rss"]["training_processes"] == 2
        assert run["rss"]["processes_seen"] > 5  # the driver, Ray's daemons and workers
        assert run["config"]["reference"] == mode.removeprefix("ecd_")
    assert on_disk["runs"]["ecd_precomputed"]["reference_s"] > 0
    for mode in ("ecd_precomputed", "ecd_resident"):
        goals = on_disk["goals"][mode]
        assert set(goals) == {"tokens_per_s", "wall", "training_process_rss", "tree_rss"}
        ecd, trl = on_disk["runs"][mode], on_disk["runs"]["trl"]
        assert goals["tokens_per_s"]["ratio"] == pytest.approx(
            ecd["tokens_per_s"] / trl["tokens_per_s"])
        assert goals["wall"]["ratio"] == pytest.approx(ecd["wall_s"] / trl["wall_s"])
        assert goals["tree_rss"]["ratio"] == pytest.approx(
            ecd["peak_tree_rss_gib"] / trl["peak_tree_rss_gib"])


@pytest.mark.slow
def test_first_step_is_ln2_with_zero_rewards_on_both_sides(smoke: dict) -> None:
    """Policy == reference at step 1, in all four modes."""
    for mode, run in smoke["runs"].items():
        first = run["steps"][0]
        assert first["loss"] == pytest.approx(LN2, abs=1e-3), mode
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
            assert first[key] == pytest.approx(0.0, abs=1e-4), (mode, key)


@pytest.mark.slow
def test_both_sides_compute_the_same_dpo(smoke: dict) -> None:
    """The same pairs per step on both sides, so the first two losses agree closely, while
    the second has moved well away from ln 2 (the agreement is not trivial)."""
    losses = {mode: [s["loss"] for s in run["steps"]] for mode, run in smoke["runs"].items()}
    ref = losses["trl"]
    assert abs(ref[1] - LN2) > 0.05
    for mode, values in losses.items():
        assert values == pytest.approx(ref, abs=1e-4), mode
    for pair, agree in smoke["loss_agreement"].items():
        assert agree["comparable_steps"] == [1, 2], pair
        assert agree["max_abs_loss_diff"] < 1e-4, pair
    ids = {mode: [sorted(s["pair_ids"]) for s in run["steps"]]
           for mode, run in smoke["runs"].items()}
    assert all(v == ids["trl"] for v in ids.values())


def _template_tokens(tokenizer, messages: list[dict], generation_prompt: bool = False) -> int:
    """Tokens of the chat template applied to ``messages``, without whitespace after the
    last end-of-turn token: computed from the template alone, not from ecd_ray's collation."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                        add_generation_prompt=generation_prompt)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    while not generation_prompt and ids and tokenizer.decode(ids[-1:]).strip() == "":
        ids.pop()
    return len(ids)


@pytest.mark.slow
def test_tokens_per_step_are_the_same_on_both_sides_and_match_the_template(
        smoke: dict) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smoke["_test"]["model"])
    rows = {r["pair_id"]: r for r in chat_pairs(8)}
    pairs_file = smoke["_test"]["work"] / "pairs" / "pairs.parquet"
    assert [r["pair_id"] for r in pq.read_table(pairs_file).to_pylist()] == list(rows)
    for step in range(2):
        per_mode = {mode: run["steps"][step]["tokens"] for mode, run in smoke["runs"].items()}
        assert len(set(per_mode.values())) == 1, per_mode
        # max_length 64 cuts some answers: independent count = template tokens, capped
        want = sum(min(_template_tokens(tokenizer, [*r["prompt"], *r[side]]), 64)
                   for r in rows.values() for side in ("chosen", "rejected"))
        prompts = [_template_tokens(tokenizer, r["prompt"], generation_prompt=True)
                   for r in rows.values()]
        assert max(prompts) <= 32  # the prompts fit max_prompt_tokens (64 // 2): none is cut
        assert per_mode["trl"] == want


# ---------------------------------------------------------------------------------------------
# Pure helpers


def test_trained_tokens_match_the_chat_template(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from ecd_ray.train.collate import CollateConfig, collate_pairs, tokenize_table_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = chat_pairs(6)
    pairs = tokenize_table_rows(tokenizer, rows, CollateConfig(max_prompt_tokens=512,
                                                              max_length=1024))
    want = sum(_template_tokens(tokenizer, [*r["prompt"], *r[side]])
               for r in rows for side in ("chosen", "rejected"))
    assert bench.trained_tokens(pairs) == want
    assert bench.trained_tokens(pairs) == int(collate_pairs(pairs, 0)["attention_mask"].sum())


def test_step_stats_leave_out_the_first_step() -> None:
    steps = [{"tokens": 100, "step_time_s": 10.0}, {"tokens": 300, "step_time_s": 2.0},
             {"tokens": 100, "step_time_s": 3.0}]
    got = bench.step_stats(steps)
    assert got["tokens_per_s"] == pytest.approx(400 / 5)
    assert got["mean_step_time_s"] == pytest.approx(2.5)
    assert got["tokens"] == 500 and got["steps_time_s"] == pytest.approx(15.0)
    one = bench.step_stats(steps[:1])
    assert one["tokens_per_s"] == pytest.approx(10.0) and one["timed_steps"] == 1
    assert math.isnan(bench.step_stats([])["tokens_per_s"])


def test_trl_order_follows_ecds_micro_batches() -> None:
    log = [  # two ranks, two micro-batches per step; rank 1 re-ran one after a restart
        {"rank": 0, "step": 1, "micro": 0, "pair_ids": ["a", "b"]},
        {"rank": 1, "step": 1, "micro": 0, "pair_ids": ["c", "d"]},
        {"rank": 0, "step": 1, "micro": 1, "pair_ids": ["e", "f"]},
        {"rank": 1, "step": 1, "micro": 1, "pair_ids": ["x", "y"]},
        {"rank": 1, "step": 1, "micro": 1, "pair_ids": ["g", "h"]},
        {"rank": 1, "step": 2, "micro": 2, "pair_ids": ["k", "l"]},
        {"rank": 0, "step": 2, "micro": 2, "pair_ids": ["i", "j"]},
        {"rank": 0, "step": 2, "micro": 3, "pair_ids": ["m"]},
        {"rank": 1, "step": 2, "micro": 3, "pair_ids": ["n", "o"]},
    ]
    by_step = bench.micro_batches_by_step(log)
    assert by_step[1] == [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]]
    order, exact = bench.trl_order(by_step, 1, 2)
    assert order == list("abcdefgh") and exact
    order, exact = bench.trl_order(by_step, 2, 2)
    assert order[8:] == list("ijklmno") and not exact  # ["m"] is short
    with pytest.raises(ValueError, match="step 3"):
        bench.trl_order(by_step, 3, 2)


def _run(tok: float, wall: float, proc: float, tree: float, ok: bool = True) -> dict:
    return {"ok": ok, "tokens_per_s": tok, "wall_s": wall,
            "rss": {"peak_training_process_rss_gib": proc, "peak_tree_rss_gib": tree}}


def test_goal_ratios_against_trls_default() -> None:
    runs = {"trl": _run(40, 600, 5.0, 5.5), "trl_precompute": _run(35, 900, 4.9, 4.9),
            "ecd_precomputed": _run(64, 450, 2.5, 6.0), "ecd_resident": _run(1, 1, 1, 1, False)}
    goals = bench.goal_ratios(runs)
    assert set(goals) == {"ecd_precomputed"}  # a failed run has no ratios
    g = goals["ecd_precomputed"]
    assert g["tokens_per_s"] == {"ratio": pytest.approx(1.6), "goal": ">= 1.5", "met": True}
    assert g["wall"]["ratio"] == pytest.approx(0.75) and g["wall"]["met"]
    assert g["training_process_rss"]["ratio"] == pytest.approx(0.5)
    assert g["training_process_rss"]["met"]
    assert g["tree_rss"]["ratio"] == pytest.approx(6.0 / 5.5) and not g["tree_rss"]["met"]
    vs_pre = bench.goal_ratios(runs, "trl_precompute")["ecd_precomputed"]
    assert vs_pre["wall"]["ratio"] == pytest.approx(0.5)
    assert bench.goal_ratios({"ecd_precomputed": runs["ecd_precomputed"]}) == {}


def test_comparable_steps_stop_at_other_pairs_or_another_lr() -> None:
    def steps(pairs: list[list[str]], lrs: list[float]) -> list[dict]:
        return [{"step": i + 1, "pair_ids": p, "lr": lr, "loss": 0.1 * i}
                for i, (p, lr) in enumerate(zip(pairs, lrs, strict=True))]

    a = steps([["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]], [1.0, 1.0, 0.9, 0.5])
    assert bench.comparable_steps(a, steps([["b", "a"], ["d", "c"], ["e", "f"], ["g", "h"]],
                                           [1.0, 1.0, 0.9, 0.5])) == [1, 2, 3, 4]
    # step 3's lr differs: step 3's loss is still comparable, step 4's is not
    assert bench.comparable_steps(a, steps([["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]],
                                           [1.0, 1.0, 0.8, 0.5])) == [1, 2, 3]
    assert bench.comparable_steps(a, steps([["a", "b"], ["c", "x"], ["e", "f"], ["g", "h"]],
                                           [1.0, 1.0, 0.9, 0.5])) == [1]
    runs = {"trl": {"ok": True, "steps": a}, "ecd_resident": {"ok": True, "steps": a[:3]}}
    agree = bench.loss_agreement(runs)["trl vs ecd_resident"]
    assert agree["comparable_steps"] == [1, 2, 3] and agree["max_abs_loss_diff"] == 0.0
    assert agree["lr_differs_from_step"] is None


def test_write_subset_takes_the_first_pairs_across_shards(tmp_path: Path) -> None:
    _write(tmp_path / "src" / "b.parquet", chat_pairs(3, start=10))
    _write(tmp_path / "src" / "a.parquet", chat_pairs(2))
    ids = bench.write_subset(tmp_path / "src", 4, tmp_path / "out")
    assert ids == ["p0", "p1", "p10", "p11"]
    table = pq.read_table(tmp_path / "out" / "pairs.parquet")
    assert table.column("pair_id").to_pylist() == ids and table.schema.equals(PAIRS)
    with pytest.raises(ValueError, match="fewer"):
        bench.write_subset(tmp_path / "src", 6, tmp_path / "out2")


# A process that allocates `mib` MiB, touches `ready` once it has, and lives until `stop` exists.
ALLOC = ("import os, sys, time; x = b'\\x01' * ({mib} << 20); open({ready!r}, 'w').close()\n"
         "t = time.monotonic()\n"
         "while not os.path.exists({stop!r}) and time.monotonic() - t < 120: time.sleep(0.05)")


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t0 < timeout, f"{path.name} never appeared"
        time.sleep(0.05)


def test_sampler_counts_descendants_and_tagged_orphans_only(tmp_path: Path) -> None:
    """The root allocates 60 MiB; its child starts a grandchild (120 MiB) and exits at once,
    so the grandchild is re-parented and found only by the tag; a process outside the command
    (150 MiB, no tag) is never counted. Sampling starts only once the child has exited and
    every process has allocated (signal files, not sleeps), so no sample can see the
    grandchild while it is still a descendant, however slow the machine."""
    stop = tmp_path / "stop"
    grandchild = ALLOC.format(mib=120, ready=str(tmp_path / "grandchild"), stop=str(stop))
    child = (f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
             f"{grandchild!r}], start_new_session=True)")
    root = textwrap.dedent(f"""
        import os, subprocess, sys, time
        x = b'\\x01' * (60 << 20)
        subprocess.run([sys.executable, '-c', {child!r}], check=True)
        t = time.monotonic()
        while not os.path.exists({str(tmp_path / "grandchild")!r}) and time.monotonic() - t < 120:
            time.sleep(0.05)
        open({str(tmp_path / "root")!r}, 'w').close()
        while not os.path.exists({str(stop)!r}) and time.monotonic() - t < 120:
            time.sleep(0.05)
    """)
    tag = uuid.uuid4().hex
    outsider = subprocess.Popen([sys.executable, "-c", ALLOC.format(
        mib=150, ready=str(tmp_path / "outsider"), stop=str(stop))])
    try:
        proc = subprocess.Popen([sys.executable, "-c", root],
                                env={**os.environ, bench.TAG_ENV: tag})
        _wait_for(tmp_path / "root")  # the child has exited, the grandchild has allocated
        _wait_for(tmp_path / "outsider")
        sampler = bench.ProcessTreeSampler(proc.pid, tag, interval=0.2,
                                           root_is_training=True).start()
        time.sleep(2.0)
        stop.touch()
        proc.wait(timeout=120)
        res = sampler.stop()
    finally:
        stop.touch()
        outsider.wait(timeout=120)
    pids = {p["pid"] for p in res["top_processes"]}
    assert outsider.pid not in pids
    assert res["found_by_tag_only"] >= 1
    orphans = [p for p in res["top_processes"] if p["via"] == "tag"]
    assert max(p["peak_rss_gib"] for p in orphans) > 120 / 1024
    assert res["peak_training_process_rss_gib"] > 60 / 1024  # the root
    assert res["training_processes"] == 1
    assert res["peak_tree_rss_gib"] > 180 / 1024
    assert res["peak_tree_rss_gib"] < (60 + 120 + 150) / 1024 + 0.2  # the outsider is not in
    assert res["peak_tree_anon_gib"] <= res["peak_tree_rss_gib"]
