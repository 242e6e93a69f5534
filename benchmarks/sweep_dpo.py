"""A DPO hyper-parameter sweep on one set of pairs, scored on the held-out prompts.

    python benchmarks/sweep_dpo.py --pairs out/demo/pairs \
        --config lr=5e-5,beta=0.1,epochs=1 --config lr=1e-4,beta=0.1,epochs=1

Each ``--config`` trains DPO once (``ecd_ray.train.trainer.train``, the same code path and
defaults as ``compare_objectives.py``; keys: lr, beta, epochs, max_steps, max_pairs, and
any other ``ecd-ray train`` override such as ``label_smoothing=0.1``), then evaluates it on
the held-out prompts against the base model, with 95% bootstrap intervals and the paired
difference from the base. The JSON is rewritten after every config, so a long sweep that is
stopped keeps what it finished.

Choosing the best of several configs on the same evaluation set flatters the winner (a
multiple-comparison effect); the JSON records every config tried, not only the best.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare_objectives as co  # noqa: E402

KNOWN = {"lr": float, "beta": float, "epochs": int, "max_steps": int, "max_pairs": int}


def parse_config(text: str) -> tuple[dict[str, Any], list[str]]:
    """``lr=5e-5,beta=0.1,label_smoothing=0.1`` -> (known args, extra train overrides)."""
    known: dict[str, Any] = {}
    extra: list[str] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--config {text!r}: {item!r} is not key=value")
        if key in KNOWN:
            known[key] = KNOWN[key](value)
        else:
            extra.append(item)
    return known, extra


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ecd_ray.config import EMBEDDED_MODEL, PACKAGE_DIR
    from ecd_ray.evaluate.stats import intervals, paired_difference
    from ecd_ray.hardware import cpu_info
    from ecd_ray.pipeline.manifest import versions

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=Path, required=True, help="a run's pairs/")
    ap.add_argument("--config", action="append", required=True,
                    help="lr=..,beta=..,epochs=..[,max_steps=..][,other train overrides]")
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--eval-seeds", type=Path, default=PACKAGE_DIR / "data" / "eval_seeds.jsonl")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-pairs", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=768)
    ap.add_argument("--cpus-per-worker", type=float, default=2.0)
    ap.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"])
    ap.add_argument("--eval-dtype", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, required=True, help="keep runs here")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "dpo_sweep.json")
    args = ap.parse_args(argv)
    configs = [parse_config(c) for c in args.config]
    # compare_objectives' train_one/evaluate_one read these from the namespace
    base_ns = argparse.Namespace(**vars(args), epochs=1, max_steps=None, lr=5e-6, beta=0.1,
                                 strategy="ddp", num_workers=1, train_override=[])

    args.work.mkdir(parents=True, exist_ok=True)
    cpu = cpu_info()
    record: dict[str, Any] = {
        "benchmark": "DPO sweep on held-out evolved prompts",
        "command": shlex.join([Path(sys.executable).name, *sys.argv[:1], *(argv or sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pairs": str(args.pairs.resolve()),
        "cpu": {"model": cpu["model"], "flags": {f: f in cpu["flags"] for f in
                                                 ("avx512_bf16", "amx_bf16", "avx512f", "avx2")}},
        "versions": versions(),
        "eval": {"seeds": str(args.eval_seeds), "rounds": args.rounds},
        "runs": [],
    }
    t0 = time.perf_counter()
    prompts = args.work / "eval_prompts.jsonl"
    record["eval"]["prompts"] = co.eval_prompts(base_ns, prompts)
    base = co.evaluate_one("base", args.model, prompts, base_ns, args.work)
    record["base"] = {"intervals": intervals(base["details"]),
                      "eval_s": base["eval_s"]}
    for i, (known, extra) in enumerate(configs):
        ns = copy.copy(base_ns)
        for k, v in known.items():
            setattr(ns, k, v)
        ns.train_override = extra
        name = f"dpo-{i}"
        trained = co.train_one("dpo", ns, args.pairs.resolve(), args.work / name)
        res = co.evaluate_one(name, trained["model"], prompts, ns, args.work)
        record["runs"].append({
            "config": {"lr": ns.lr, "beta": ns.beta, "epochs": ns.epochs,
                       "max_steps": ns.max_steps, "max_pairs": ns.max_pairs, "extra": extra},
            "training": trained,
            "intervals": intervals(res["details"]),
            "vs_base": paired_difference(base["details"], res["details"]),
            "eval_s": res["eval_s"],
        })
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
        args.out.with_suffix(".md").write_text(markdown(record), encoding="utf-8")
        print(markdown(record), flush=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return record


def markdown(record: dict[str, Any]) -> str:
    m = "prompt_level_strict"
    b = record["base"]["intervals"][m]
    rows = ["| config | steps | final reward acc. | prompt strict | Δ vs base [95%] |",
            "|---|---|---|---|---|",
            f"| base | — | — | {b['value']:.1%} [{b['lo']:.1%}, {b['hi']:.1%}] | — |"]
    for r in record["runs"]:
        c, iv, d = r["config"], r["intervals"][m], r["vs_base"][m]
        label = f"lr {c['lr']:g}, beta {c['beta']:g}, epochs {c['epochs']}" + (
            f", {', '.join(c['extra'])}" if c["extra"] else "")
        rows.append(f"| {label} | {r['training']['steps']} | "
                    f"{r['training']['final_reward_accuracy']:.2f} | "
                    f"{iv['value']:.1%} [{iv['lo']:.1%}, {iv['hi']:.1%}] | "
                    f"{d['value']:+.1%} [{d['lo']:+.1%}, {d['hi']:+.1%}]"
                    f"{' *' if d['significant'] else ''} |")
    return (f"# DPO sweep: {record['eval']['prompts']} held-out prompts, pairs "
            f"{record['pairs']}\n\nCPU {record['cpu']['model']}; {record['date']}. "
            "* = the paired interval excludes 0. Every config tried is listed.\n\n"
            + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
