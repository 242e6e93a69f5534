"""Evaluation reports: ``report.json``, ``report.md`` (a markdown table) and ``accuracy.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HEADLINE = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict",
            "instruction_level_loose")


def markdown(result: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "", f"{result['prompts']} prompts, {result['instructions']} "
             "instructions", "", "| metric | accuracy |", "|---|---:|"]
    lines += [f"| {m.replace('_', ' ')} | {result[m]:.1%} |" for m in HEADLINE]
    lines += ["", "| instruction type | n | strict | loose |", "|---|---:|---:|---:|"]
    lines += [f"| `{rid}` | {t['n']} | {t['strict']:.1%} | {t['loose']:.1%} |"
              for rid, t in result["per_type"].items()]
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Per-type strict accuracy for one or more models (e.g. base vs trained), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted({rid for r in results.values() for rid in r["per_type"]})
    labels = ["prompt (strict)", "instruction (strict)"] + types
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(labels) + 1.5))
    height = 0.8 / max(len(results), 1)
    for i, (name, r) in enumerate(results.items()):
        values = [r["prompt_level_strict"], r["instruction_level_strict"]] + [
            r["per_type"].get(t, {}).get("strict", 0.0) for t in types]
        ax.barh([y + i * height for y in range(len(labels))], values, height=height, label=name)
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(labels))], labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (strict)")
    ax.set_title("Instruction-following accuracy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict[str, Any], out_dir: Path, title: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md",
             "chart": out_dir / "accuracy.png"}
    paths["json"].write_text(json.dumps(result, indent=2, ensure_ascii=False))
    paths["markdown"].write_text(markdown(result, title))
    bar_chart({title: result}, paths["chart"])
    return paths
