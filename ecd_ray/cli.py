"""``ecd-ray``: generate (a config + dotted overrides), run (the embedded demo), evaluate and
export-eval (instruction-following accuracy on IFEval-format prompts)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ecd_ray.config import (
    PACKAGE_DIR,
    ConfigError,
    EngineConfig,
    RunConfig,
    load_config,
    load_train_config,
)

DEMO_CONFIG = PACKAGE_DIR / "configs" / "demo.yaml"
DEMO_TRAIN_CONFIG = PACKAGE_DIR / "configs" / "demo_train.yaml"


def _table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def summary(manifest: dict[str, Any]) -> str:
    """The end-of-run table: counts per stage, accounting, where the outputs are."""
    c, a = manifest["counts"], manifest["accounting"]
    rows = [
        ("run folder", manifest["run_dir"]),
        ("elapsed", f"{manifest['elapsed_s']} s"),
        ("seed rows read", c["seed_rows_read"]),
        ("seeds valid / rejected", f"{c['seeds_valid']} / {c['seeds_rejected']}"),
        ("chains (answered levels: count)", c["answered_levels_per_chain"]),
        ("chain stop reasons", c["chain_stop_reasons"]),
        ("pairs", c["pairs"]),
        ("pairs per chosen level", c["pairs_per_chosen_level"]),
        ("seeds with pairs / without", f"{a['seeds_with_pairs']} / {a['seeds_without_pairs']}"),
        ("rejects (stage:reason)", c["rejects"] or "none"),
        ("teacher completion tokens", c["completion_tokens"]),
        ("every seed accounted for", "yes" if a["ok"] else f"NO: {a}"),
    ]
    engines = manifest.get("engines") or []
    if engines:
        e = engines[0]
        rows.insert(2, ("engine", f"{e.get('engine')} x{len(engines)}, {e.get('dtype')} "
                                  f"({e.get('dtype_reason')}), {e.get('max_chains')} chains "
                                  "in flight per actor"))
    timings = manifest.get("timings") or {}
    if timings.get("chains_s"):
        tokens = manifest.get("tokens_this_session", 0)
        rows.insert(3, ("chains phase", f"{timings['chains_s']} s, "
                                        f"{tokens / timings['chains_s']:.0f} output tok/s "
                                        f"(engine start {timings.get('engine_start_s')} s)"))
    if "actor_restarts" in manifest:
        rows.append(("engine actor restarts", manifest["actor_restarts"]))
    text = "ECD generation summary\n" + _table(rows)
    v = manifest.get("verification")
    if v:
        text += "\n\nVerification (pairs.policy=" + manifest["config"]["pairs"]["policy"] + ")\n"
        text += _table([
            ("pairs written (train + heldout)", f"{v['pairs']} ({c['heldout_pairs']} heldout)"),
            ("verified hard negatives", f"{v['verified_hard_negatives']} "
                                        f"({100 * v['verified_share']:.1f}%)"),
            ("requirements the rejected side misses: pairs", v["rejected_missed_distribution"]),
        ])
        rates = v["teacher_pass_rate"]
        if rates:
            head = "teacher pass rate per requirement"
            width = max(len(head), *(len(k) for k in rates))
            text += f"\n\n  {head:<{width}}  {'n':>5}  strict  loose\n"
            text += "\n".join(f"  {rid:<{width}}  {r['n']:>5}  {r['strict']:>6.1%}  "
                               f"{r['loose']:>5.1%}" for rid, r in rates.items())
    return text


def _generate(cfg: RunConfig, verbose: bool = False) -> int:
    from ecd_ray.pipeline.generate import DiskFull, RunInterrupted, generate, resume_command

    try:
        manifest = generate(cfg, verbose=verbose)
    except FileExistsError as exc:  # a finished run, another config, or another process's
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DiskFull as exc:
        print(f"error: {exc}; resume with:\n  {resume_command()}", file=sys.stderr)
        return 1
    except RunInterrupted as exc:
        print(f"\nstopped: {exc}; the run is resumable, with:\n  {resume_command()}",
              file=sys.stderr)
        return 130
    print(summary(manifest))
    return 0 if manifest["accounting"]["ok"] else 1


def _evaluate(args: argparse.Namespace) -> int:
    from ecd_ray.evaluate import evaluate
    from ecd_ray.evaluate.report import HEADLINE

    if (args.model is None) == (args.responses is None):
        print("error: give exactly one of --model (generate answers) or --responses (score "
              "existing answers)", file=sys.stderr)
        return 2
    engine_cfg = None
    if args.model is not None:
        try:
            engine_cfg = EngineConfig(engine=args.engine, model=args.model,
                                      temperature=args.temperature,
                                      max_new_tokens=args.max_new_tokens, num_cpus=2)
        except ValidationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        result = evaluate(args.prompts, args.out, engine_cfg=engine_cfg,
                          responses_path=args.responses)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_table([(m.replace("_", " "), f"{result[m]:.1%}") for m in HEADLINE]
                 + [("prompts / instructions", f"{result['prompts']} / {result['instructions']}"),
                    ("report", result["files"]["markdown"]), ("chart", result["files"]["chart"])]))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """generate -> reference log-probs -> train -> evaluate base and trained; each step reuses
    a finished earlier result of the same config, so a stopped demo continues where it was."""
    from ecd_ray.pipeline import manifest as mf

    gen_over = [o for o in args.overrides if not o.startswith("train.")]
    train_over = [o[len("train."):] for o in args.overrides if o.startswith("train.")]
    try:
        cfg = load_config(DEMO_CONFIG, gen_over)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    old = mf.read(cfg.run_dir)
    if old and old.get("status") == "complete" and old.get("config_hash") == mf.config_hash(cfg):
        print(f"reusing the finished generation run in {cfg.run_dir}")
        print(summary(old))
    elif (rc := _generate(cfg, args.verbose)) != 0:
        return rc
    if args.no_train:
        return 0
    try:
        tcfg = load_train_config(DEMO_TRAIN_CONFIG, [
            f"pairs={cfg.run_dir.resolve() / 'pairs'}", f"output_dir={cfg.output_dir}",
            f"run_name={cfg.run_name}-dpo", *train_over])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _train_and_compare(cfg, tcfg)


def _train_and_compare(cfg: RunConfig, tcfg: Any) -> int:
    import json

    from ecd_ray.evaluate import evaluate
    from ecd_ray.evaluate.export import export_eval
    from ecd_ray.evaluate.report import HEADLINE, bar_chart
    from ecd_ray.train.trainer import train

    done = tcfg.run_dir / "train_summary.json"
    s = json.loads(done.read_text()) if done.exists() else train(tcfg)
    print(_train_table(s))
    prompts = cfg.run_dir / "eval_prompts.jsonl"
    export_eval(cfg.run_dir, prompts)
    results = {}
    for name, model in (("base", cfg.teacher.model), ("trained", s["model"])):
        engine = EngineConfig(engine="auto", model=model, temperature=0.0, max_new_tokens=384,
                              num_cpus=2)
        results[name] = evaluate(prompts, cfg.run_dir / f"eval_{name}", engine_cfg=engine,
                                 title=name)
    chart = cfg.run_dir / "eval_base_vs_trained.png"
    bar_chart(results, chart)
    b, t = results["base"], results["trained"]
    print(f"Instruction-following accuracy on {b['prompts']} held-out evolved prompts\n"
          + _table([(m.replace("_", " "), f"base {b[m]:.1%}   trained {t[m]:.1%}")
                    for m in HEADLINE] + [("chart", chart)]))
    return 0


def _train_table(s: dict[str, Any]) -> str:
    return "Training summary\n" + _table([
        ("model (HF folder)", s["model"]), ("pairs", s["pairs"]),
        ("optimizer steps", f"{s['steps']} / {s['planned_steps']}"),
        ("loss first -> last step", f"{s['first_loss']:.4f} -> {s['final_loss']:.4f}"),
        ("reward accuracy (last step)", f"{s['final_reward_accuracy']:.1%}"),
        ("step time (mean)", f"{s['mean_step_time_s']:.2f} s"),
        ("tokens/s (mean, all workers)", f"{s['mean_tokens_per_s']:.0f}"),
        ("peak memory per worker", f"{s['peak_rss_gib_per_worker']:.2f} GiB"),
        ("elapsed", f"{s['elapsed_s']} s"),
    ])


def _train(args: argparse.Namespace) -> int:
    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ecd_ray.train.trainer import train  # torch: only once the config is valid
    try:
        s = train(cfg)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_train_table(s))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ecd_ray.evaluate.export import export_eval

    out = args.out or args.run / "eval_prompts.jsonl"
    try:
        n = export_eval(args.run, out, all_seeds=args.all_seeds)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} evaluation prompts to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ecd-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="evolve seeds and write ECD preference pairs")
    gen.add_argument("--config", type=Path, help="YAML config (defaults apply when omitted)")
    gen.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rounds=4")
    gen.add_argument("-v", "--verbose", action="store_true",
                     help="show engine, Ray and library logs (else in <run>/logs/)")
    run = sub.add_parser("run", help="the embedded demo: generate, train, evaluate (local Ray)")
    run.add_argument("overrides", nargs="*",
                     help="dotted overrides, e.g. seeds.limit=20; train.* go to training "
                          "(train.max_steps=3)")
    run.add_argument("--no-train", action="store_true", help="generate only")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="show engine, Ray and library logs (else in <run>/logs/)")
    tr = sub.add_parser("train", help="DPO/IPO/SLiC/SFT on Ray Train with DeepSpeed ZeRO")
    tr.add_argument("--config", type=Path, help="YAML train config (defaults when omitted)")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_steps=20")
    pl = sub.add_parser("plan", help="will a config fit its GPUs? (weights, KV cache, ZeRO)")
    pl.add_argument("--config", type=Path, help="generation YAML (a training YAML works too)")
    pl.add_argument("--train-config", type=Path, default=None)
    pl.add_argument("--gpu", default="h100-80gb",
                    help="h100-80gb, h200-141gb, a100-80gb, a100-40gb, l40s-48gb, l4-24gb, "
                         "a10g-24gb or NAME:GIB")
    pl.add_argument("--teacher-spec", default=None,
                    help="a known model name or a config.json / model folder")
    pl.add_argument("--student-spec", default=None)
    pl.add_argument("overrides", nargs="*", help="dotted overrides; train.* go to training")
    ev = sub.add_parser("evaluate", help="instruction-following accuracy (IFEval format)")
    ev.add_argument("--prompts", type=Path, required=True, help="IFEval-format JSONL")
    ev.add_argument("--model", default=None, help="model folder, or embedded:smollm2-135m-"
                    "instruct or embedded:gemma3-270m")
    ev.add_argument("--responses", type=Path, default=None,
                    help="score these responses (JSONL: key or prompt, response) instead")
    ev.add_argument("--out", type=Path, default=Path("out/eval"), help="report folder")
    ev.add_argument("--engine", default="auto", choices=["auto", "transformers", "vllm"])
    ev.add_argument("--max-new-tokens", type=int, default=384)
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ex = sub.add_parser("export-eval", help="a run's held-out evolved prompts as IFEval JSONL")
    ex.add_argument("--run", type=Path, required=True, help="run folder, e.g. out/demo")
    ex.add_argument("--out", type=Path, default=None, help="default: RUN/eval_prompts.jsonl")
    ex.add_argument("--all-seeds", action="store_true", help="not only the held-out seeds")
    args = parser.parse_args(argv)

    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command in ("generate", "run") and not verbose:
        # The console shows the progress line and warnings; the run's log file has the rest.
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "export-eval":
        return _export(args)
    if args.command == "train":
        return _train(args)
    if args.command == "plan":
        from ecd_ray.plan import main_plan

        return main_plan(args.config, args.overrides, args.gpu, args.teacher_spec,
                         args.student_spec, train_config=args.train_config)
    if args.command == "run":
        return _demo(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _generate(cfg, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
