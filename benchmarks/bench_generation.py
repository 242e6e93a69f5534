"""Generation throughput of the whole pipeline against its engine's own ceiling, in one run.

    python benchmarks/bench_generation.py                     # 64 bundled seeds, 192 tokens
    python benchmarks/bench_generation.py --seeds 128 --max-new-tokens 256 --dtype float32
    python benchmarks/bench_generation.py --seeds 6 --max-new-tokens 32 --out /tmp/g.json
    python benchmarks/bench_generation.py --seeds 360 --framings 3 --max-new-tokens 128

Same seeds (the bundled sample), same sampling, same engine (vLLM, CPU build on a CPU
machine; dtype chosen by the hardware unless --dtype), measured one after the other in this
process:

(a) pipeline, continuous: ``ecd_ray.pipeline.generate.generate`` (local Ray, one chain actor,
    continuous chain scheduling) into a temporary folder. tok/s = the run's completion tokens
    / the chain phase's seconds (manifest ``timings``: chains_ended - chains_started; engine
    start is excluded and reported on its own).
(b) engine ceiling: every answer request of run (a), rebuilt from its ``evolutions/`` (the
    same chat, the same per-request sampling seed ``request_seed(seed,
    "answer:<seed_id>:<level>")``, the same max tokens), submitted at once in ONE offline
    ``VLLMEngine.generate`` call; timed around that call only.
(c) pipeline, lock-step: as (a) with ``scheduler.mode=lockstep teacher.batch_size=16`` (the
    old step-barrier scheduling).

Reports (a)/(b), (c)/(b) and (a)/(c), each side's tokens and seconds, the engine settings,
CPU model and flags, versions, the command line and the date; plots tok/s and the engine's
requests in flight over time for (a) and (c) (from ``logs/occupancy-000.jsonl``). Results:
benchmarks/results/generation.json and generation.png (``--out`` chooses the JSON path; the
PNG goes next to it). Quote ratios from one run only: the machines are noisy.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")


# Framings that turn one bundled seed into several distinct seeds (--framings N > 1): the
# bundled sample holds 120 seeds, and a run whose chains all fit in the engine at once never
# reaches a steady state. A throughput seed set, not a data set.
FRAMINGS = ("", "Explain it for a high-school student. ", "Write for a busy professional. ",
            "Keep a friendly, informal tone. ", "Aim it at an expert reader. ",
            "Write as if for a company newsletter. ")


def seed_file(args: argparse.Namespace, work: Path) -> Path | None:
    """The bundled seeds, each under ``args.framings`` framings; None for the bundled file."""
    if args.framings <= 1:
        return None
    from ecd_ray.config import load_config
    from ecd_ray.seeds import iter_seeds

    bundled = load_config(None, []).seeds
    path = work / "bench_seeds.jsonl"
    with path.open("w") as f:
        for frame in FRAMINGS[: args.framings]:
            for seed, _ in iter_seeds(bundled):
                if seed is not None:
                    f.write(json.dumps({"instruction": f"{frame}{seed['instruction']}"}) + "\n")
    return path


def overrides(args: argparse.Namespace) -> list[str]:
    """The config of run (a); (c) adds the lock-step settings."""
    out = [f"seeds.limit={args.seeds}", f"rounds={args.rounds}", "teacher.engine=vllm",
           f"teacher.model={args.model}", f"teacher.max_new_tokens={args.max_new_tokens}",
           f"teacher.temperature={args.temperature}", f"teacher.dtype={args.dtype}",
           f"teacher.num_cpus={args.cpus}", f"teacher.vllm.cpu_threads_bind={args.threads_bind}",
           "evolution.mode=template", f"seed={args.seed}", "overwrite=true"]
    if args.max_num_seqs is not None:
        out.append(f"teacher.vllm.max_num_seqs={args.max_num_seqs}")
    if getattr(args, "seed_path", None) is not None:
        out.append(f"seeds.path={args.seed_path}")
    return out


def read_occupancy(run_dir: Path, t0: float) -> list[dict[str, float]]:
    """The actor's occupancy samples, time relative to the start of the chain phase."""
    out = []
    for path in sorted((run_dir / "logs").glob("occupancy-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                s = json.loads(line)
                out.append({"t": round(s["t"] - t0, 2), "requests": s["requests"],
                            "chains": s["chains"], "tokens": s["tokens"]})
    return sorted(out, key=lambda s: s["t"])


def run_pipeline(name: str, extra: list[str], args: argparse.Namespace, work: Path
                 ) -> dict[str, Any]:
    """(a) or (c): the real pipeline; tokens / seconds of its chain phase."""
    from ecd_ray.config import load_config
    from ecd_ray.pipeline.generate import generate

    cfg = load_config(None, [*overrides(args), *extra, f"output_dir={work}",
                             f"run_name={name}"])
    print(f"[{name}] ecd-ray generate {' '.join(extra)} ...", flush=True)
    manifest = generate(cfg)
    t = manifest["timings"]
    seconds = t["chains_ended"] - t["chains_started"]
    tokens = manifest["counts"]["completion_tokens"]
    occupancy = read_occupancy(cfg.run_dir, t["chains_started"])
    engine = (manifest.get("engines") or [{}])[0]
    cap = engine.get("capacity")
    res = {
        "run": name,
        "config_overrides": [*overrides(args), *extra],
        "scheduler": {"mode": cfg.scheduler.mode, "max_chains": engine.get("max_chains"),
                      "batch_size": cfg.teacher.batch_size if cfg.scheduler.mode == "lockstep"
                      else None},
        "output_tokens": tokens,
        "seconds": round(seconds, 2),
        "output_tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "engine_start_s": t["engine_start_s"],
        "chains_s": t["chains_s"],
        "chains": manifest["counts"]["chains"],
        "answered_levels_per_chain": manifest["counts"]["answered_levels_per_chain"],
        "chain_stop_reasons": manifest["counts"]["chain_stop_reasons"],
        "accounting_ok": manifest["accounting"]["ok"],
        "engine": engine,
        "mean_requests_in_flight": round(sum(s["requests"] for s in occupancy)
                                         / len(occupancy), 1) if occupancy else None,
        "mean_occupancy": round(sum(s["requests"] for s in occupancy) / len(occupancy) / cap,
                                3) if occupancy and cap else None,
        "occupancy": occupancy,
    }
    print(f"[{name}] {tokens} tokens in {seconds:.1f} s: {res['output_tokens_per_s']} tok/s "
          f"(engine start {t['engine_start_s']} s)", flush=True)
    return res


def answer_requests(run_dir: Path, system_prompt: str | None) -> tuple[list[Any], int]:
    """Every answer request of a run, rebuilt from its ``evolutions/`` as the chains sent
    them; and the completion tokens the run recorded for them."""
    import pyarrow.parquet as pq

    from ecd_ray.engines.base import ChatRequest, Sampling, request_seed

    requests, recorded = [], 0
    for path in sorted((run_dir / "evolutions").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            sampling = json.loads(row["sampling_json"])
            ans, gseed = sampling["answer"], sampling["seed"]
            for lvl in row["levels"]:
                if lvl["response_source"] != "teacher":
                    continue  # a seed's own answer: no request was sent
                rid = f"answer:{row['seed_id']}:{lvl['level']}"
                messages = ([{"role": "system", "content": system_prompt}]
                            if system_prompt else []) + [
                    {"role": "user", "content": lvl["instruction"]}]
                requests.append(ChatRequest(rid, messages, Sampling(
                    temperature=ans["temperature"], top_p=ans["top_p"],
                    max_new_tokens=ans["max_new_tokens"],
                    min_new_tokens=ans["min_new_tokens"], seed=request_seed(gseed, rid))))
                recorded += lvl["completion_tokens"] or 0
    return requests, recorded


def _stop_engine(eng: Any) -> None:
    """Stop the offline engine's core process now (VLLMEngine.close only drops the reference
    and leaves the shutdown to garbage collection)."""
    core = getattr(getattr(getattr(eng, "llm", None), "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    eng.close()
    gc.collect()


def run_ceiling(run_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """(b): run (a)'s answer requests in one offline ``VLLMEngine.generate`` call."""
    from ecd_ray.config import load_config
    from ecd_ray.engines.vllm_engine import VLLMEngine
    from ecd_ray.models import resolve_model

    cfg = load_config(None, overrides(args))
    t = cfg.teacher
    requests, recorded = answer_requests(run_dir, t.system_prompt)
    env = dict(os.environ)  # VLLMEngine sets vLLM's CPU variables; (c) must not inherit them
    print(f"[ceiling] {len(requests)} requests in one VLLMEngine.generate call ...", flush=True)
    try:
        t0 = time.perf_counter()
        eng = VLLMEngine(resolve_model(t.model), t.vllm, dtype=t.dtype,
                         num_cpus=max(1, int(t.num_cpus)), seed=cfg.seed,
                         scratch=work / "ceiling-scratch", model_name=t.model)
        load_s = time.perf_counter() - t0
        bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        t0 = time.perf_counter()
        results = eng.generate(requests)
        seconds = time.perf_counter() - t0
        dtype, reason = eng.dtype, eng.dtype_reason
        _stop_engine(eng)
    finally:
        os.environ.clear()
        os.environ.update(env)
    tokens = sum(r.completion_tokens for r in results)
    res = {
        "run": "ceiling",
        "requests": len(requests),
        "output_tokens": tokens,
        "seconds": round(seconds, 2),
        "output_tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "engine_start_s": round(load_s, 1),
        "tokens_recorded_by_run_a": recorded,
        "finished_by_length": sum(r.finish_reason == "length" for r in results),
        "errors": sum(r.finish_reason == "error" for r in results),
        "engine": {"engine": "VLLMEngine (offline vllm.LLM.chat)", "dtype": dtype,
                   "dtype_reason": reason, "threads_bind": bind},
    }
    print(f"[ceiling] {tokens} tokens in {seconds:.1f} s: {res['output_tokens_per_s']} tok/s",
          flush=True)
    return res


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("(a) pipeline, continuous", record["pipeline_continuous"], "tab:green"),
            ("(b) engine ceiling, all at once", record["engine_ceiling"], "tab:blue"),
            ("(c) pipeline, lock-step 16", record["pipeline_lockstep"], "tab:gray")]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7))
    rates = [r["output_tokens_per_s"] or 0 for _, r, _ in runs]
    ax1.barh([n for n, _, _ in runs], rates, color=[c for _, _, c in runs])
    ceiling = record["engine_ceiling"]["output_tokens_per_s"] or 0
    for i, rate in enumerate(rates):
        share = f" ({rate / ceiling:.0%} of (b))" if ceiling and i != 1 else ""
        ax1.text(rate, i, f" {rate:.0f} tok/s{share}", va="center", fontsize=9)
    ax1.invert_yaxis()
    ax1.set_xlim(0, max(rates + [1]) * 1.45)
    s = record["settings"]
    ax1.set_xlabel("output tokens/s (engine start excluded)")
    n_seeds = record["pipeline_continuous"].get("chains") or s["seeds"]
    ax1.set_title(f"{n_seeds} seeds x {s['rounds'] + 1} levels, <= {s['max_new_tokens']} "
                  f"new tokens, {record['engine']['dtype']}, {record['cpu']['model'][:40]}",
                  fontsize=9)
    cap = record["engine"]["max_num_seqs"]
    for name, r, color in (runs[0], runs[2]):
        occ = r["occupancy"]
        if occ:
            ax2.step([o["t"] for o in occ], [o["requests"] for o in occ], where="post",
                     label=name, color=color)
    ax2.axhline(cap, color="k", ls="--", lw=0.8, label=f"max_num_seqs={cap}")
    ax2.set_xlabel("seconds since the chain phase started")
    ax2.set_ylabel("requests in flight")
    # requests beyond max_num_seqs wait in vLLM's queue: still in flight for the scheduler
    peak = max([o["requests"] for _, r, _ in (runs[0], runs[2]) for o in r["occupancy"]] or [0])
    ax2.set_ylim(0, max(cap, peak) * 1.1)
    ax2.legend(fontsize=8, loc="upper right")
    ax2.set_title("engine occupancy (sampled every 0.5 s by the chain actor)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=64, help="bundled sample seeds")
    ap.add_argument("--framings", type=int, default=1, choices=range(1, len(FRAMINGS) + 1),
                    help="seed set: every bundled seed under this many framings (1 = the "
                         "bundled file; 4 = 480 distinct seeds)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bf16 with native bf16 instructions, else fp32")
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="vLLM max_num_seqs (default: the config's)")
    ap.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)),
                    help="cores the engine binds (teacher.num_cpus); default: all")
    ap.add_argument("--threads-bind", default="auto",
                    help="teacher.vllm.cpu_threads_bind, e.g. 0-1 (default: the --cpus cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "generation.json",
                    help="the JSON result; the PNG goes next to it")
    ap.add_argument("--keep-runs", type=Path, default=None,
                    help="keep the run folders here (default: a temporary folder, deleted)")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from ecd_ray.config import load_config
    from ecd_ray.hardware import cpu_info
    from ecd_ray.pipeline.manifest import versions

    work = args.keep_runs or Path(tempfile.mkdtemp(prefix="bench_generation-"))
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    args.seed_path = seed_file(args, work)
    cfg = load_config(None, overrides(args))
    try:
        a = run_pipeline("continuous", [], args, work)
        b = run_ceiling(work / "continuous", args, work)
        c = run_pipeline("lockstep", ["scheduler.mode=lockstep", "teacher.batch_size=16"],
                         args, work)
    finally:
        if args.keep_runs is None:
            shutil.rmtree(work, ignore_errors=True)

    cpu = cpu_info()

    def ratio(x: dict[str, Any], y: dict[str, Any]) -> float | None:
        if not x["output_tokens_per_s"] or not y["output_tokens_per_s"]:
            return None
        return round(x["output_tokens_per_s"] / y["output_tokens_per_s"], 3)

    record = {
        "benchmark": "generation: pipeline vs engine ceiling",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "wall_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "definitions": {
            "pipeline_continuous": "(a) ecd_ray.pipeline.generate.generate, continuous "
                                   "chains: completion tokens / (chains_ended - chains_started)",
            "engine_ceiling": "(b) (a)'s answer requests rebuilt from its evolutions/, one "
                              "offline VLLMEngine.generate call, timed around the call",
            "pipeline_lockstep": "(c) as (a) with scheduler.mode=lockstep "
                                 "teacher.batch_size=16",
        },
        "settings": {"seeds": args.seeds,  # requested; the chains run: pipeline_*.chains
                     "seed_file": (cfg.seeds.path if args.framings <= 1 else
                                   f"bundled sample x {args.framings} framings"),
                     "rounds": args.rounds,
                     "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                     "top_p": cfg.teacher.top_p, "model": args.model,
                     "evolution_mode": "template", "seed": args.seed,
                     "framings": list(FRAMINGS[: args.framings])},
        "engine": {
            "engine": "vllm", "max_num_seqs": cfg.teacher.vllm.max_num_seqs,
            "max_model_len": cfg.teacher.vllm.max_model_len,
            "dtype": b["engine"]["dtype"], "dtype_reason": b["engine"]["dtype_reason"],
            "dtype_pipeline": a["engine"].get("dtype"), "cpus": args.cpus,
            "threads_bind": b["engine"]["threads_bind"],
            "cpu_kvcache_gib": cfg.teacher.vllm.cpu_kvcache_gib,
            "enable_prefix_caching": cfg.teacher.vllm.enable_prefix_caching,
            "enforce_eager": cfg.teacher.vllm.enforce_eager,
        },
        "cpu": {"model": cpu["model"], "cores": len(os.sched_getaffinity(0)),
                **{f: f in cpu["flags"] for f in FLAGS}},
        "versions": versions(),
        "ratios": {"continuous_over_ceiling": ratio(a, b), "lockstep_over_ceiling": ratio(c, b),
                   "continuous_over_lockstep": ratio(a, c)},
        "pipeline_continuous": a,
        "engine_ceiling": b,
        "pipeline_lockstep": c,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    png = args.out.with_suffix(".png")
    plot(record, png)
    print(json.dumps({k: record[k] for k in ("ratios", "engine", "cpu")}, indent=1))
    for key in ("pipeline_continuous", "engine_ceiling", "pipeline_lockstep"):
        r = record[key]
        print(f"{key:<20} {r['output_tokens']:>8} tokens {r['seconds']:>8.1f} s "
              f"{r['output_tokens_per_s']:>8} tok/s")
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
