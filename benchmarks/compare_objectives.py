"""SFT vs SLiC vs DPO vs DPO with the curriculum, on the same pairs and budget (APC's study).

    python benchmarks/compare_objectives.py --pairs out/demo/pairs           # reuse a run
    python benchmarks/compare_objectives.py                                  # generate first
    python benchmarks/compare_objectives.py --objectives dpo --lr 1e-5 --beta 0.1 ...

1. Pairs: ``--pairs DIR`` (a run's ``pairs/``), or a generation run on the bundled sample
   seeds (``ecd_ray.pipeline.generate``, the demo's settings, ``pairs.holdout_fraction=0``:
   evaluation uses separate seeds).
2. Held-out prompts: the bundled ``eval_seeds.jsonl`` (156 seeds that never reach training;
   any seed whose instruction is also in the training seed file is dropped), evolved in
   template mode exactly as a generation run would evolve them (``rounds`` levels, the
   run's global seed); every level with checkable requirements is one prompt (333 with the
   defaults).
3. Training: ``ecd_ray.train.trainer.train`` once per objective, the same pairs (the first
   ``--max-pairs``), steps, optimizer, learning rate, batch and maximum length; only the loss
   (and the curriculum order) differs. ``dpo_curriculum`` is DPO with ``curriculum=true``
   (stage 0 pairs first; see ecd_ray/curriculum.py).
4. Evaluation: the base model and each trained model answer every held-out prompt (greedy,
   ``--max-new-tokens``, the same engine), scored by the IFEval-style checkers: prompt- and
   instruction-level accuracy, strict and loose, each with a 95% bootstrap interval over
   prompts, and each trained model's paired difference from the base with its interval
   (``significant`` when the interval excludes 0).

Writes ``--out`` (JSON), the same name with ``.md`` (the table) and ``.png`` (the chart).
Everything runs on the local machine (local Ray for generation and training).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OBJECTIVES = {  # name -> train config overrides
    "sft": ["loss=sft"],
    "slic": ["loss=slic"],
    "dpo": ["loss=dpo"],
    "dpo_curriculum": ["loss=dpo", "curriculum=true"],
}
LABELS = {"prompt_level_strict": "prompt strict", "prompt_level_loose": "prompt loose",
          "instruction_level_strict": "instr. strict", "instruction_level_loose": "instr. loose"}


def generate_pairs(args: argparse.Namespace, work: Path) -> Path:
    from ecd_ray.cli import DEMO_CONFIG
    from ecd_ray.config import load_config
    from ecd_ray.pipeline.generate import generate

    cfg = load_config(DEMO_CONFIG, [f"output_dir={work}", "run_name=pairs",
                                    "pairs.holdout_fraction=0", f"teacher.model={args.model}",
                                    *args.generate_override])
    print(f"[pairs] ecd-ray generate {' '.join(args.generate_override)}", flush=True)
    generate(cfg)
    return cfg.run_dir / "pairs"


def eval_prompts(args: argparse.Namespace, out: Path) -> int:
    from ecd_ray.config import SAMPLE_SEEDS, SeedsConfig
    from ecd_ray.evaluate.export import export_template_prompts
    from ecd_ray.seeds import iter_seeds

    train_seeds = {s["instruction"] for s, _ in iter_seeds(SeedsConfig(path=str(SAMPLE_SEEDS)))
                   if s is not None}
    n = export_template_prompts(SeedsConfig(path=str(args.eval_seeds)), out,
                                rounds=args.rounds, global_seed=args.seed, exclude=train_seeds)
    if args.eval_limit:
        lines = out.read_text(encoding="utf-8").splitlines()[: args.eval_limit]
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        n = len(lines)
    return n


def train_one(name: str, args: argparse.Namespace, pairs: Path, work: Path) -> dict[str, Any]:
    from ecd_ray.config import load_train_config
    from ecd_ray.train.trainer import train

    over = [f"pairs={pairs}", f"output_dir={work}", f"run_name=train-{name}",
            f"model={args.model}", f"lr={args.lr}", f"beta={args.beta}",
            f"max_pairs={args.max_pairs}", f"epochs={args.epochs}",
            f"micro_batch_size={args.micro_batch_size}", f"grad_accum={args.grad_accum}",
            f"max_length={args.max_length}", f"max_prompt_tokens={min(256, args.max_length // 2)}",
            "schedule=cosine",
            f"strategy={args.strategy}", f"num_workers={args.num_workers}",
            f"cpus_per_worker={args.cpus_per_worker}", "checkpoint_every=1000",
            f"seed={args.seed}", "overwrite=true", *OBJECTIVES[name], *args.train_override]
    if args.max_steps:
        over.append(f"max_steps={args.max_steps}")
    if args.strategy == "deepspeed":
        over.append("zero_stage=3")
    cfg = load_train_config(None, over)
    print(f"[train {name}] ecd-ray train {' '.join(OBJECTIVES[name])}", flush=True)
    s = train(cfg)
    return {k: s[k] for k in ("model", "pairs", "steps", "elapsed_s", "first_loss",
                              "final_loss", "final_reward_accuracy", "mean_tokens_per_s")} | {
        "overrides": over}


def train_all(args: argparse.Namespace, pairs: Path, work: Path) -> dict[str, dict[str, Any]]:
    """Every objective, one after another, in one Ray session (a cluster start per run costs
    more than a smoke run's training)."""
    import ray

    from ecd_ray.config import load_train_config
    from ecd_ray.train.trainer import init_ray

    started = init_ray(load_train_config(None, [f"pairs={pairs}", f"model={args.model}",
                                                f"num_workers={args.num_workers}",
                                                f"cpus_per_worker={args.cpus_per_worker}"]))
    try:
        return {name: train_one(name, args, pairs, work) for name in args.objectives}
    finally:
        if started:
            ray.shutdown()


def evaluate_one(name: str, model: str, prompts: Path, args: argparse.Namespace, work: Path
                 ) -> dict[str, Any]:
    from ecd_ray.config import EngineConfig
    from ecd_ray.evaluate import evaluate

    engine = EngineConfig(engine=args.engine, model=model, temperature=0.0,
                          max_new_tokens=args.max_new_tokens, num_cpus=args.cpus_per_worker
                          * args.num_workers, dtype=args.eval_dtype, batch_size=32)
    print(f"[eval {name}] {model}", flush=True)
    started = time.perf_counter()
    res = evaluate(prompts, work / f"eval-{name}", engine_cfg=engine, title=name)
    res["eval_s"] = round(time.perf_counter() - started, 1)
    return res


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ecd_ray.evaluate.stats import intervals, paired_difference

    base = results["base"]["details"]
    out = {}
    for name, res in results.items():
        entry: dict[str, Any] = {"intervals": intervals(res["details"])}
        if name != "base":
            entry["vs_base"] = paired_difference(base, res["details"])
        out[name] = entry
    return out


def markdown(record: dict[str, Any]) -> str:
    rows = ["| model | " + " | ".join(LABELS.values()) + " |",
            "|---|" + "---|" * len(LABELS)]
    for name, s in record["summary"].items():
        cells = []
        for m in LABELS:
            iv = s["intervals"][m]
            cell = f"{iv['value']:.1%} [{iv['lo']:.1%}, {iv['hi']:.1%}]"
            if "vs_base" in s:
                d = s["vs_base"][m]
                mark = " *" if d["significant"] else ""
                cell += f"<br>Δ {d['value']:+.1%} [{d['lo']:+.1%}, {d['hi']:+.1%}]{mark}"
            cells.append(cell)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    st = record["settings"]
    return (f"# Objectives compared on {record['eval']['prompts']} held-out prompts\n\n"
            f"{st['max_pairs']} pairs, {st['steps']} optimizer steps, lr {st['lr']}, beta "
            f"{st['beta']}; CPU {record['cpu']['model']}; {record['date']}.\n"
            "Value [95% bootstrap interval over prompts]; Δ = paired difference from the base "
            "model, * = its interval excludes 0.\n\n" + "\n".join(rows) + "\n")


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(record["summary"])
    metrics = list(LABELS)
    x = np.arange(len(metrics))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, name in enumerate(names):
        ivs = [record["summary"][name]["intervals"][m] for m in metrics]
        vals = np.array([iv["value"] for iv in ivs])
        err = np.array([[iv["value"] - iv["lo"] for iv in ivs],
                        [iv["hi"] - iv["value"] for iv in ivs]])
        ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, yerr=err, capsize=3,
               label=name)
    ax.set_xticks(x, [LABELS[m] for m in metrics])
    ax.set_ylabel("accuracy (95% bootstrap interval)")
    ax.set_title(f"{record['eval']['prompts']} held-out evolved prompts, "
                 f"{record['settings']['max_pairs']} pairs, {record['settings']['steps']} steps "
                 f"({record['cpu']['model']})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ecd_ray.config import EMBEDDED_MODEL, PACKAGE_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=Path, help="a run's pairs/ (default: generate them)")
    ap.add_argument("--generate-override", nargs="*", default=[],
                    help="overrides of the generation run (e.g. seeds.limit=60)")
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    ap.add_argument("--eval-seeds", type=Path, default=PACKAGE_DIR / "data" / "eval_seeds.jsonl")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N prompts only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-pairs", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=768)
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "deepspeed"])
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--cpus-per-worker", type=float, default=2.0)
    ap.add_argument("--train-override", nargs="*", default=[])
    ap.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"])
    ap.add_argument("--eval-dtype", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep runs here (default: temp)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "compare_objectives.json")
    args = ap.parse_args(argv)

    from ecd_ray.hardware import cpu_info
    from ecd_ray.pipeline.manifest import versions

    work = args.work or Path(tempfile.mkdtemp(prefix="compare_objectives-"))
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    try:
        pairs = (args.pairs.resolve() if args.pairs else generate_pairs(args, work))
        prompts = work / "eval_prompts.jsonl"
        n_prompts = eval_prompts(args, prompts)
        trained = train_all(args, pairs, work)
        results = {"base": evaluate_one("base", args.model, prompts, args, work)}
        for name, t in trained.items():
            results[name] = evaluate_one(name, t["model"], prompts, args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    cpu = cpu_info()
    steps = sorted({t["steps"] for t in trained.values()})
    record = {
        "benchmark": "objectives: SFT vs SLiC vs DPO vs DPO + curriculum",
        "command": shlex.join([Path(sys.executable).name, *sys.argv[:1], *(argv or sys.argv[1:])]),
        "date": started.isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "settings": {"model": args.model, "pairs": str(pairs), "max_pairs": args.max_pairs,
                     "epochs": args.epochs, "steps": steps[0] if len(steps) == 1 else steps,
                     "lr": args.lr, "beta": args.beta,
                     "batch": args.micro_batch_size * args.grad_accum * args.num_workers,
                     "max_length": args.max_length, "strategy": args.strategy,
                     "workers": args.num_workers, "cpus_per_worker": args.cpus_per_worker,
                     "eval_engine": args.engine, "eval_max_new_tokens": args.max_new_tokens,
                     "eval_temperature": 0.0, "train_overrides": args.train_override},
        "eval": {"seeds": str(args.eval_seeds), "rounds": args.rounds, "prompts": n_prompts},
        "cpu": {"model": cpu["model"], "flags": {f: f in cpu["flags"] for f in
                                                 ("avx512_bf16", "amx_bf16", "avx512f", "avx2")}},
        "versions": versions(),
        "training": trained,
        "evaluation": {name: {k: v for k, v in r.items() if k not in ("details", "files")}
                       for name, r in results.items()},
        "summary": summarise(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    args.out.with_suffix(".md").write_text(markdown(record), encoding="utf-8")
    plot(record, args.out.with_suffix(".png"))
    print(markdown(record))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()
