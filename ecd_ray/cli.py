"""``ecd-ray``: generate (a config + dotted overrides) and run (the embedded demo)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from ecd_ray.config import PACKAGE_DIR, ConfigError, RunConfig, load_config

DEMO_CONFIG = PACKAGE_DIR / "configs" / "demo.yaml"


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
    return "ECD generation summary\n" + _table(rows)


def _generate(cfg: RunConfig) -> int:
    from ecd_ray.pipeline.generate import generate

    try:
        manifest = generate(cfg)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(manifest))
    return 0 if manifest["accounting"]["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ecd-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="evolve seeds and write ECD preference pairs")
    gen.add_argument("--config", type=Path, help="YAML config (defaults apply when omitted)")
    gen.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rounds=4")
    run = sub.add_parser("run", help="the embedded demo: bundled seeds, SmolLM2, local Ray")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seeds.limit=20")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config_path = DEMO_CONFIG if args.command == "run" else args.config
    try:
        cfg = load_config(config_path, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _generate(cfg)


if __name__ == "__main__":
    sys.exit(main())
