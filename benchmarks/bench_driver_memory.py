"""Peak driver memory of ``ecd-ray generate`` at 1x, 10x and 100x seeds.

    .venv/bin/python benchmarks/bench_driver_memory.py            # 120 / 1,200 / 12,000 seeds
    .venv/bin/python benchmarks/bench_driver_memory.py --base 60  # smaller, for a quick look

The pipeline, not the model, is under test: the transformers engine with a tiny random Llama
(2 layers, SmolLM2's tokenizer, built here as in tests/conftest.py), 1 round, 2 new tokens.
Each size runs ``ecd_ray.cli.main`` in its own process, which reports its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``: the driver alone, not Ray's workers). Seeds are
distinct synthetic instructions. Writes ``benchmarks/results/driver_memory.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

CHILD = """
import json, resource, sys, time
from ecd_ray.cli import main
t = time.time()
rc = main(sys.argv[1:])
print("RESULT " + json.dumps({"rc": rc, "seconds": round(time.time() - t, 1),
      "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def tiny_model(dest: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ecd_ray.models import embedded_model_dir

    base_dir = embedded_model_dir()
    base = json.loads((base_dir / "config.json").read_text())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=base["vocab_size"], hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=2048, bos_token_id=base["bos_token_id"],
        eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"],
        tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(dest, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        if (base_dir / name).exists():
            shutil.copy(base_dir / name, dest / name)
    return dest


def seeds_file(path: Path, n: int) -> Path:
    topics = ["rivers", "bridges", "volcanoes", "markets", "orchards", "satellites", "glaciers"]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"instruction": f"Write two sentences about {topics[i % 7]} "
                                               f"number {i} and why they matter."}) + "\n")
    return path


def run(model: Path, seeds: Path, out: Path, n: int) -> dict:
    args = ["generate", f"output_dir={out}", f"run_name=n{n}", f"seeds.path={seeds}",
            f"teacher.model={model}", "teacher.engine=transformers", "teacher.dtype=float32",
            "rounds=1", "teacher.max_new_tokens=2", "teacher.batch_size=64",
            "teacher.temperature=0",  # greedy: the random model's flat logits make top-p slow
            "teacher.num_cpus=1", "ray.num_cpus=2", "pairs.policy=all"]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True,
                          text=True, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"run with {n} seeds failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line[-1][len("RESULT "):])
    manifest = json.loads((out / f"n{n}" / "manifest.json").read_text())
    result.update(seeds=n, chains=manifest["counts"]["chains"],
                  accounting_ok=manifest["accounting"]["ok"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=120, help="seeds at 1x")
    parser.add_argument("--out", type=Path, default=RESULTS / "driver_memory.json")
    args = parser.parse_args()
    from ecd_ray.hardware import cpu_info

    with tempfile.TemporaryDirectory(prefix="ecd-mem-") as tmp:
        tmp_path = Path(tmp)
        model = tiny_model(tmp_path / "tiny")
        runs = []
        for factor in (1, 10, 100):
            n = args.base * factor
            r = run(model, seeds_file(tmp_path / f"seeds-{n}.jsonl", n), tmp_path / "out", n)
            print(f"{n:>6} seeds: peak driver RSS {r['maxrss_mib']} MiB, {r['seconds']} s, "
                  f"accounting ok={r['accounting_ok']}", flush=True)
            runs.append(r)
    growth = runs[-1]["maxrss_mib"] / runs[0]["maxrss_mib"] - 1
    cpu = cpu_info()
    data = {
        "what": "peak RSS of the generate driver process at 1x/10x/100x seeds (transformers "
                "engine, tiny random Llama, 1 round, 2 new tokens)",
        "runs": runs, "growth_1x_to_100x": round(growth, 4),
        "cpu": {"model": cpu["model"],
                "flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                          if f in cpu["flags"]]},
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["seeds"] for r in runs], [r["maxrss_mib"] for r in runs], "o-")
    ax.set_xscale("log")
    ax.set_ylim(0, max(r["maxrss_mib"] for r in runs) * 1.3)
    ax.set_xlabel("seeds")
    ax.set_ylabel("peak driver RSS (MiB)")
    ax.set_title(f"Driver memory vs seeds (growth 1x->100x: {growth:+.1%})")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"growth 1x -> 100x: {growth:+.1%}; wrote {args.out}")


if __name__ == "__main__":
    main()
