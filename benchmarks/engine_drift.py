"""The soak's engine alone, with no pipeline around it: is its throughput flat over minutes on
this machine? (issue 12: the control for ``soak.py``)

    .venv/bin/python benchmarks/engine_drift.py                       # 5 minutes
    .venv/bin/python benchmarks/engine_drift.py --seconds 30 --window 10 --out /tmp/d.json

The same transformers engine, tiny random Llama (``bench_driver_memory.tiny_model``), fp32,
batches of 64, 32 new tokens greedy (min = max) and one compute thread, as the soak's chain
actor runs them (``teacher.num_cpus=1``), on the soak's own instructions; no Ray, no driver, no
shards. Batches run back to back for ``--seconds``; each window of ``--window`` s records the
tokens/s and the tokens per CPU-second of this process. If this drifts as much as the soak,
the soak's drift is the machine's, not the pipeline's. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from bench_driver_memory import tiny_model  # noqa: E402 - the soak's model
from soak import flatness, seeds_file  # noqa: E402 - the soak's seeds and its flatness test


def run(args: argparse.Namespace, work: Path) -> list[dict[str, float]]:
    """One record per batch: (seconds since start, tokens, CPU seconds of this process)."""
    import torch

    from ecd_ray.engines.base import ChatRequest, Sampling
    from ecd_ray.engines.hf import TransformersEngine

    torch.set_num_threads(1)
    engine = TransformersEngine(tiny_model(work / "tiny"), dtype="float32", max_batch=64,
                                threads=1)
    seeds = [json.loads(x)["instruction"]
             for x in seeds_file(work / "seeds.jsonl", 64 * 50).read_text().splitlines()]
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens)
    batches, i = [], 0
    t0, c0 = time.monotonic(), time.process_time()
    while time.monotonic() - t0 < args.seconds:
        reqs = [ChatRequest(str(i + j), [{"role": "user", "content": seeds[(i + j) % len(seeds)]}],
                            sampling) for j in range(64)]
        i += 64
        out = engine.generate(reqs)
        batches.append({"t": time.monotonic() - t0, "tokens": sum(r.completion_tokens for r in out),
                        "cpu_s": time.process_time() - c0})
    engine.close()
    return batches


def windows(batches: list[dict[str, float]], window: float,
            new_tokens: int) -> list[dict[str, Any]]:
    """Tokens/s and tokens per CPU-second per window; a batch counts in the window it ends in.
    ``seeds_per_min`` counts one answer of ``new_tokens`` as a chain, as the soak's are."""
    out, start, prev_cpu = [], 0.0, 0.0
    while start + window <= batches[-1]["t"] + 1e-9:
        inside = [b for b in batches if start < b["t"] <= start + window]
        if inside:
            tokens = sum(b["tokens"] for b in inside)
            cpu = inside[-1]["cpu_s"] - prev_cpu
            prev_cpu = inside[-1]["cpu_s"]
            out.append({"start_s": round(start, 1), "end_s": round(start + window, 1),
                        "tokens_per_s": round(tokens / window, 1),
                        "tokens_per_cpu_s": round(tokens / cpu, 1) if cpu > 0 else None,
                        "seeds_per_min": round(tokens / new_tokens / window * 60, 1),
                        "steady": start >= batches[0]["t"]})  # after the first batch
        start += window
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--window", type=float, default=60)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--flat-tolerance", type=float, default=0.10)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "engine_drift.json")
    args = ap.parse_args(argv)
    from ecd_ray.hardware import cpu_info

    with tempfile.TemporaryDirectory(prefix="ecd-drift-") as tmp:
        batches = run(args, Path(tmp))
    wins = windows(batches, args.window, args.new_tokens)
    cpu = cpu_info()
    per_cpu = [w["tokens_per_cpu_s"] for w in wins if w["tokens_per_cpu_s"]]
    data = {
        "what": "the soak's engine alone: transformers, tiny random Llama, fp32, 1 thread, "
                f"batches of 64, {args.new_tokens} new tokens greedy, back to back",
        "batches": len(batches), "seconds": round(batches[-1]["t"], 1),
        "windows": wins, "throughput": flatness(wins, args.flat_tolerance),
        "tokens_per_cpu_s": {"min": min(per_cpu), "max": max(per_cpu),
                             "mean": round(statistics.fmean(per_cpu), 1)} if per_cpu else None,
        "cpu": {"model": cpu["model"], "cores": os.cpu_count(),
                "flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                          if f in cpu["flags"]]},
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["benchmarks/engine_drift.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "series": [{k: round(v, 3) for k, v in b.items()} for b in batches],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    plot(data, args.out.with_suffix(".png"))
    for w in wins:
        print(f"  {w['start_s']:>6.0f}-{w['end_s']:<6.0f} s: {w['tokens_per_s']:>7.1f} tok/s, "
              f"{w['tokens_per_cpu_s']} tokens per CPU-s")
    th = data["throughput"]
    print(f"{len(batches)} batches in {data['seconds']} s; worst deviation "
          f"{th.get('worst_deviation')} over {th['steady_windows']} windows (flat={th['flat']}); "
          f"wrote {args.out}")
    return data


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wins = data["windows"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar([w["start_s"] for w in wins], [w["tokens_per_s"] for w in wins],
           width=[w["end_s"] - w["start_s"] for w in wins], align="edge", alpha=0.6,
           label="tokens/s")
    ax.plot([(w["start_s"] + w["end_s"]) / 2 for w in wins],
            [w["tokens_per_cpu_s"] for w in wins], "o-", color="tab:red",
            label="tokens per CPU-s")
    ax.set_xlabel("time (s)")
    ax.legend()
    ax.set_title(f"the soak's engine alone (worst dev {data['throughput'].get('worst_deviation')})"
                 f", {data['cpu']['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
