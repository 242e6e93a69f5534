"""One training knob on and off, side by side, in alternating runs of ``ecd-ray train`` (issue 11).

    python benchmarks/bench_train_ab.py --knob malloc_trim --pairs /tmp/bench_work/pairs
    python benchmarks/bench_train_ab.py --knob gradient_checkpointing --pairs /tmp/bench_work/pairs

Knobs (``KNOBS``):

- ``malloc_trim``: the CPU workers' ``malloc_trim`` after every micro-batch, on (the default)
  and off (``ECD_RAY_MALLOC_TRIM=0``);
- ``gradient_checkpointing``: ``gradient_checkpointing=on`` against ``off`` (``auto``, the
  default, is off on CPU).

The two sides run in alternating order (on, off, on, off, ...) so that a machine slowing down
over the run weighs on both alike. Every run is ``bench_train.py``'s ecd configuration, built by
its own ``ecd_overrides`` (SmolLM2-135M-Instruct in fp32, the first ``--n-pairs`` pairs, 8 pairs
per optimizer step over the trainer's default ZeRO-3 2 workers x 1 CPU, max_length 768), with
``reference=resident``, cut to ``--steps`` steps. Recorded per run:
each step's time, loss and the workers' peak RSS after it (from ``metrics.jsonl``), and the peak
RSS of every training process and of the whole process tree, sampled every 0.5 s by
``bench_train.ProcessTreeSampler``. Writes JSON and a PNG (``results/<knob>.json``).

(``results/malloc_trim.json`` was written by this script under its earlier name,
``bench_malloc_trim.py``, whose runs were this script's ``--knob malloc_trim``.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bench_train as bt  # noqa: E402 - beside this script

# knob -> (environment of the "off" side, overrides of the "on" side, of the "off" side)
KNOBS: dict[str, tuple[dict[str, str], list[str], list[str]]] = {
    "malloc_trim": ({"ECD_RAY_MALLOC_TRIM": "0"}, [], []),
    "gradient_checkpointing": ({}, ["gradient_checkpointing=on"],
                               ["gradient_checkpointing=off"]),
}


def one_run(base: list[str], work: Path, knob: str, on: bool, i: int,
            timeout: float) -> dict[str, Any]:
    from ecd_ray.train.trainer import MALLOC_TRIM_ENV

    off_env, on_overrides, off_overrides = KNOBS[knob]
    name = f"{'on' if on else 'off'}-{i}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", MALLOC_TRIM_ENV, *off_env)}
    if not on:
        env.update(off_env)
    overrides = [*base, "reference=resident", f"run_name={name}",
                 *(on_overrides if on else off_overrides)]
    cmd = [sys.executable, "-m", "ecd_ray.cli", "train", *overrides]
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    run = bt.run_measured(cmd, env, work / f"{name}.log", interval=0.5, timeout=timeout,
                          is_training=lambda title: "RayTrainWorker" in title)
    metrics = work / "ecd" / name / "metrics.jsonl"
    steps = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    rss = run["rss"]
    out = {"name": name, "on": on, "returncode": run["returncode"],
           "wall_s": round(run["wall_s"], 1),
           "step_time_s": [round(s["step_time_s"], 2) for s in steps],
           "worker_peak_rss_gib_by_step": [round(s["peak_rss_gib"], 3) for s in steps],
           "loss": [s["loss"] for s in steps],
           "peak_training_process_rss_gib": round(rss["peak_training_process_rss_gib"], 3),
           "peak_tree_rss_gib": round(rss["peak_tree_rss_gib"], 3)}
    print(f"[{name}] {json.dumps({k: v for k, v in out.items() if k != 'loss'})}", flush=True)
    if run["returncode"] != 0:
        raise RuntimeError(f"[{name}] ecd-ray train exited {run['returncode']}: see "
                           f"{work / (name + '.log')}")
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def side(on: bool) -> dict[str, float]:
        rs = [r for r in runs if r["on"] is on]
        later = [t for r in rs for t in r["step_time_s"][1:]]  # step 1 holds warm-up costs
        return {"mean_step_s_after_first": statistics.fmean(later),
                "peak_training_process_rss_gib": max(r["peak_training_process_rss_gib"]
                                                     for r in rs),
                "peak_tree_rss_gib": max(r["peak_tree_rss_gib"] for r in rs),
                "mean_wall_s": statistics.fmean(r["wall_s"] for r in rs)}
    on, off = side(True), side(False)
    return {"on": on, "off": off,
            "on_over_off": {k: round(on[k] / off[k], 3) for k in on}}


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in record["runs"]:
        style = "-" if r["on"] else "--"
        steps = range(1, len(r["step_time_s"]) + 1)
        a.plot(steps, r["step_time_s"], style, marker="o", label=r["name"])
        b.plot(steps, r["worker_peak_rss_gib_by_step"], style, marker="o", label=r["name"])
    a.set(xlabel="step", ylabel="step time (s)", title="step time")
    b.set(xlabel="step", ylabel="GiB", title="workers' peak RSS so far")
    a.legend(fontsize=8)
    fig.suptitle(f"{record['knob']} on (solid) vs off (dashed), {record['cpu']['model']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ecd_ray.config import EMBEDDED_MODEL
    from ecd_ray.hardware import cpu_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--knob", choices=sorted(KNOBS), required=True)
    ap.add_argument("--pairs", type=Path, required=True, help="a folder of pairs Parquet")
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--n-pairs", type=int, default=48)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (on, off)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--work", type=Path, default=None, help="default: /tmp/bench_ab_<knob>")
    ap.add_argument("--out", type=Path, default=None, help="default: results/<knob>.json")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2: step 1 holds warm-up costs and is left out")
    from ecd_ray.models import resolve_model

    args.work = args.work or Path(f"/tmp/bench_ab_{args.knob}")
    args.out = args.out or HERE / "results" / f"{args.knob}.json"

    # bench_train's own ecd configuration (its defaults: 8 pairs a step, max_length 768...)
    bench = bt.parse_args(["--pairs", str(args.pairs), "--model", args.model,
                           "--n-pairs", str(args.n_pairs), "--steps", str(args.steps)])
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    ctx = {"work": work, "model_dir": resolve_model(args.model),
           "pairs_file": work / "pairs" / "pairs.parquet",
           "max_prompt_tokens": min(512, bench.max_length // 2)}
    bt.write_subset(args.pairs, args.n_pairs, ctx["pairs_file"].parent)
    workers = bt.ecd_num_workers([f"pairs={ctx['pairs_file'].parent}",
                                  f"model={ctx['model_dir']}"])
    base = bt.ecd_overrides(bench, ctx, workers)
    started = datetime.now(timezone.utc)
    runs = [one_run(base, work, args.knob, on, i, args.timeout)
            for i in range(args.repeats) for on in (True, False)]
    cpu = cpu_info()
    record = {"benchmark": f"ecd-ray train, {args.knob}: on vs off", "knob": args.knob,
              "command": " ".join(["python", "benchmarks/bench_train_ab.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "date": started.isoformat(timespec="seconds"),
              "cpu": {"model": cpu["model"], "cores": os.cpu_count(),
                      "avx512_bf16": "avx512_bf16" in cpu["flags"],
                      "amx_bf16": "amx_bf16" in cpu["flags"]},
              "settings": {"n_pairs": args.n_pairs, "steps": args.steps,
                           "repeats": args.repeats, "model": str(ctx["model_dir"]),
                           "overrides": base},
              "runs": runs, "summary": summary(runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, args.out.with_suffix(".png"))
    print(json.dumps(record["summary"], indent=1))
    return record


if __name__ == "__main__":
    main()
