"""Teacher-engine throughput, side by side in one run: transformers vs vLLM on the same chats.

    python benchmarks/bench_engines.py                       # embedded SmolLM2, 32 seeds
    python benchmarks/bench_engines.py --prompts 64 --max-new-tokens 256 --model DIR

Each engine runs in its own subprocess (fresh memory, vLLM's spawn guard), answers the same
bundled seed instructions with the same sampling settings, and reports load time, generation
time and output tokens/s. Results: benchmarks/results/engines.json and engines.png. Quote the
ratio between engines from one run only: the machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_engine(engine: str, model: str, n: int, max_new_tokens: int, cpus: int) -> dict:
    """Runs in the child process: load the engine, answer n seeds, time both."""
    from ecd_ray.config import EngineConfig, SeedsConfig
    from ecd_ray.engines import ChatRequest, Sampling, build_engine, request_seed
    from ecd_ray.seeds import read_seeds

    seeds = read_seeds(SeedsConfig(limit=n)).seeds
    cfg = EngineConfig(engine=engine, model=model, max_new_tokens=max_new_tokens,
                       num_cpus=cpus, threads=cpus, batch_size=n)
    t0 = time.perf_counter()
    eng = build_engine(cfg, seed=0)
    load_s = time.perf_counter() - t0
    requests = [ChatRequest(s["seed_id"], [{"role": "user", "content": s["instruction"]}],
                            Sampling(temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens,
                                     seed=request_seed(0, s["seed_id"]))) for s in seeds]
    t0 = time.perf_counter()
    results = eng.generate(requests)
    gen_s = time.perf_counter() - t0
    tokens = sum(r.completion_tokens for r in results)
    return {"engine": engine, "prompts": n, "load_s": round(load_s, 1),
            "generate_s": round(gen_s, 1), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / gen_s, 1),
            "finished_by_length": sum(r.finish_reason == "length" for r in results)}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = [r["engine"] for r in results]
    ax.barh(names, [r["output_tokens_per_s"] for r in results])
    for i, r in enumerate(results):
        ax.text(r["output_tokens_per_s"], i, f" {r['output_tokens_per_s']:.0f} tok/s",
                va="center")
    ax.set_xlabel("output tokens/s (generation only, same prompts)")
    ax.set_title(f"Teacher engines, {results[0]['prompts']} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["transformers", "vllm"])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # engines print their own logs on stdout: the result goes to a file
        Path(args.child_out).write_text(json.dumps(run_engine(
            args.child, args.model, args.prompts, args.max_new_tokens, args.cpus)))
        return 0
    results = []
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    for engine in args.engines:
        child_out = out_dir / f".{engine}.json"
        cmd = [sys.executable, __file__, "--child", engine, "--child-out", str(child_out),
               "--model", args.model, "--prompts", str(args.prompts), "--max-new-tokens",
               str(args.max_new_tokens), "--cpus", str(args.cpus)]
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(child_out.read_text()))
        child_out.unlink()
        print(results[-1], flush=True)
    record = {"model": args.model, "max_new_tokens": args.max_new_tokens, "cpus": args.cpus,
              "machine": platform.platform(), "results": results}
    if len(results) == 2:
        record["ratio_tokens_per_s"] = round(
            results[1]["output_tokens_per_s"] / results[0]["output_tokens_per_s"], 2)
    (out_dir / "engines.json").write_text(json.dumps(record, indent=2))
    plot(results, out_dir / "engines.png")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
