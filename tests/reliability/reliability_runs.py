"""Helpers of the reliability tests that run the real pipeline: one small deterministic run
configuration (transformers engine, float32, the tiny random model), the CLI as a process, and
the checks every finished run must pass."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads

from ecd_ray import runlock
from ecd_ray.config import SAMPLE_SEEDS

N_SEEDS = 12


def run_args(out: Path, model: Path, name: str) -> list[str]:
    """Overrides of the small run: ~6 shards of 2 chains, written about a second apart."""
    return [
        f"run_name={name}", f"output_dir={out}", f"seeds.path={SAMPLE_SEEDS}",
        f"seeds.limit={N_SEEDS}", f"teacher.model={model}", "teacher.engine=transformers",
        "rounds=2", "teacher.max_new_tokens=24", "teacher.min_new_tokens=24",
        "teacher.temperature=1.0", "teacher.dtype=float32", "teacher.batch_size=2",
        "scheduler.max_chains_per_actor=2", "scheduler.flush_rows=2",
        "scheduler.flush_seconds=2", "ray.num_cpus=2", "pairs.policy=all",
        # a random tiny model never stops on its own: keep its cut answers as pairs
        "pairs.truncated_chosen=keep",
    ]


def cli() -> list[str]:
    script = Path(sys.executable).parent / "ecd-ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ecd_ray.cli"]


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``ecd-ray generate ARGS`` in its own session (so the test can stop it by group id)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*cli(), "generate", *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(proc: subprocess.Popen[bytes], timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Whatever the run started and left running: its process group, by id."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def table(folder: Path) -> list[dict[str, Any]]:
    return pads.dataset(folder, format="parquet").to_table().to_pylist() \
        if folder.exists() else []


def pairs(run_dir: Path) -> list[dict[str, Any]]:
    """Every pair (train and heldout), whole rows, in pair-id order."""
    return sorted(table(run_dir / "pairs") + table(run_dir / "heldout"),
                  key=lambda p: p["pair_id"])


def check_complete(run_dir: Path) -> dict[str, Any]:
    """The run finished, released its lock, and wrote every seed's chain exactly once."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    acct = manifest["accounting"]
    assert acct["ok"], acct
    assert acct["chains"] == N_SEEDS and acct["duplicate_chains"] == 0
    ids = [c["seed_id"] for c in table(run_dir / "evolutions")]
    assert len(ids) == len(set(ids)) == N_SEEDS
    assert not (run_dir / runlock.LOCK_FILE).exists()
    return manifest
