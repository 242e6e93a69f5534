"""The generation core under faults, with real Ray, a real (tiny) model and the real CLI:

* an over-long seed becomes a reject and its neighbours still get pairs;
* a SIGKILLed engine actor is restarted and every seed is accounted for exactly once;
* a shard written by an actor that died before its report reached the driver is kept (its
  hash checked) and its seeds are not redone;
* a SIGKILLed driver, then the same command, gives the pair ids of an uninterrupted run;
* Ctrl-C (SIGINT to the process group, as a terminal sends it) stops the run within 10 s,
  and the same command then finishes it.

Each run is a separate ``python -m ecd_ray.cli generate`` process in its own session, so the
test can signal it (and the Ray processes it started) by process-group id, never by name; the
lost-report test runs ``generate`` in this process, where it can drop the report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest

from ecd_ray.config import SAMPLE_SEEDS

# 12 seeds x 24 tokens in shards of 2 chains (~6 shards a few seconds apart): each run ~40 s
# here, 36 x 48 took ~115 s, with the same kill windows relative to the run.
N_SEEDS = 12


def _args(tmp_path: Path, model: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "ecd_ray.cli", "generate", f"run_name={name}",
        f"output_dir={tmp_path}", f"seeds.path={SAMPLE_SEEDS}", f"seeds.limit={N_SEEDS}",
        f"teacher.model={model}", "teacher.engine=transformers", "rounds=2",
        "teacher.max_new_tokens=24", "teacher.min_new_tokens=24", "teacher.temperature=1.0",
        "teacher.dtype=float32",
        "teacher.batch_size=2", "scheduler.max_chains_per_actor=2", "scheduler.flush_rows=2",
        "scheduler.flush_seconds=2", "ray.num_cpus=2", "pairs.policy=all",
        # a random tiny model never stops on its own: keep its cut answers as pairs
        "pairs.truncated_chosen=keep", *extra,
    ]


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _finish(proc: subprocess.Popen[bytes], timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Whatever the test started and is still running: the group of the process it made."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _shards(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "evolutions").glob("part-*.parquet"))


def _table(folder: Path) -> list[dict[str, Any]]:
    return pads.dataset(folder, format="parquet").to_table().to_pylist() \
        if folder.exists() else []


def _pair_ids(run_dir: Path) -> list[str]:
    return sorted(p["pair_id"] for p in _table(run_dir / "pairs") + _table(run_dir / "heldout"))


def _check_complete(run_dir: Path) -> dict[str, Any]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    acct = manifest["accounting"]
    assert acct["ok"], acct
    assert acct["chains"] == N_SEEDS and acct["duplicate_chains"] == 0
    ids = [c["seed_id"] for c in _table(run_dir / "evolutions")]
    assert len(ids) == len(set(ids)) == N_SEEDS  # every seed written exactly once
    return manifest


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> list[str]:
    """Pair ids of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref")
    proc = _start(_args(out, tiny_model, "ref"), out / "ref.log")
    assert _finish(proc) == 0, (out / "ref.log").read_text()[-3000:]
    _check_complete(out / "ref")
    ids = _pair_ids(out / "ref")
    assert len(ids) > N_SEEDS  # rounds=2, policy=all: up to two pairs a seed
    return ids


def test_too_long_seed_is_a_reject_and_neighbours_get_pairs(tmp_path: Path,
                                                            tiny_model: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    long = " ".join(f"word{i}" for i in range(3000))  # ~6000 tokens > 2048 positions
    rows = [{"instruction": "Explain why the sky is blue."}, {"instruction": long},
            {"instruction": "Name three rivers in Europe."}]
    seeds.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = [a for a in _args(tmp_path, tiny_model, "long") if not a.startswith("seeds.")]
    proc = _start([*args, f"seeds.path={seeds}", "seeds.max_instruction_chars=100000"],
                  tmp_path / "long.log")
    assert _finish(proc) == 0, (tmp_path / "long.log").read_text()[-3000:]
    run_dir = tmp_path / "long"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["accounting"]["ok"]
    rejects = [r for r in _table(run_dir / "rejects") if r["stage"] == "answer"]
    assert [r["reason"] for r in rejects] == ["prompt_too_long"]
    assert "2048" in rejects[0]["raw"] or "2048" in rejects[0]["detail"]
    paired = {p["seed_id"] for p in _table(run_dir / "pairs") + _table(run_dir / "heldout")}
    chains = {c["seed_id"]: c for c in _table(run_dir / "evolutions")}
    long_id = rejects[0]["seed_id"]
    assert chains[long_id]["num_levels"] == 0
    assert paired == set(chains) - {long_id}


def test_killed_engine_actor_is_restarted_and_no_seed_is_lost_or_doubled(
        tmp_path: Path, tiny_model: Path, reference: list[str]) -> None:
    proc = _start(_args(tmp_path, tiny_model, "a"), tmp_path / "a.log")
    run_dir = tmp_path / "a"
    try:
        line = _wait_for(lambda: re.search(r"chain actor 0 ready: .*'pid': (\d+)",
                                           _read(run_dir / "logs" / "generate.log")),
                         180, "the engine actor")
        _wait_for(lambda: _shards(run_dir), 180, "a first shard")
        os.kill(int(line.group(1)), signal.SIGKILL)  # the engine actor, by its process id
        assert _finish(proc) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        _kill_group(proc)
    manifest = _check_complete(run_dir)
    assert manifest["actor_restarts"] == 1
    assert _pair_ids(run_dir) == reference


def test_killed_driver_then_same_command_gives_the_uninterrupted_pairs(
        tmp_path: Path, tiny_model: Path, reference: list[str]) -> None:
    args = _args(tmp_path, tiny_model, "b")
    proc = _start(args, tmp_path / "b1.log")
    run_dir = tmp_path / "b"
    try:
        _wait_for(lambda: len(_shards(run_dir)) >= 2, 240, "two shards")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    finally:
        _kill_group(proc)
    written = {p.name for p in _shards(run_dir)}
    assert 0 < len(written)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"
    proc = _start(args, tmp_path / "b2.log")
    try:
        assert _finish(proc) == 0, (tmp_path / "b2.log").read_text()[-3000:]
    finally:
        _kill_group(proc)
    _check_complete(run_dir)
    assert written <= {p.name for p in _shards(run_dir)}  # nothing on disk was redone
    assert _pair_ids(run_dir) == reference


def test_ctrl_c_stops_within_10_s_and_the_run_resumes(tmp_path: Path, tiny_model: Path,
                                                      reference: list[str]) -> None:
    args = _args(tmp_path, tiny_model, "c")
    proc = _start(args, tmp_path / "c1.log")
    run_dir = tmp_path / "c"
    try:
        _wait_for(lambda: _shards(run_dir), 240, "a first shard")
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        rc = _finish(proc, timeout=30)
        stopped_in = time.monotonic() - sent
    finally:
        _kill_group(proc)
    out = (tmp_path / "c1.log").read_text()
    assert rc == 130, out[-3000:]
    assert stopped_in < 10, f"took {stopped_in:.1f} s to stop"
    assert "resumable" in out and "ecd-ray generate run_name=c" in out
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"
    proc = _start(args, tmp_path / "c2.log")
    try:
        assert _finish(proc) == 0, (tmp_path / "c2.log").read_text()[-3000:]
    finally:
        _kill_group(proc)
    _check_complete(run_dir)
    assert _pair_ids(run_dir) == reference


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_a_shard_written_but_never_reported_is_recovered_not_redone(
        tmp_path: Path, tiny_model: Path, reference: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine actor writes a shard and dies before its report reaches the driver (the
    report is lost with the process). The driver must find that shard on disk, check its hash
    and count its seeds as done: redoing them would write them twice. In-process, so that the
    loss is certain: the first report that carries shards is dropped, and the actor that sent
    it SIGKILLed, before the driver applies it."""
    import psutil

    from ecd_ray.config import load_config
    from ecd_ray.pipeline import generate as gen

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(None, _args(tmp_path, tiny_model, "u")[4:])
    run_dir = tmp_path / "u"
    lost: list[str] = []
    apply = gen._Pool._apply

    def lose_the_first_report(pool: Any, actor: Any, report: dict[str, Any]) -> None:
        if report["shards"] and not lost:
            proc = psutil.Process(actor.info["pid"])
            proc.kill()  # the engine actor, by its process id
            proc.wait(timeout=60)
            lost.extend(s["name"] for s in report["shards"])
            return  # never applied: the driver next polls the dead actor and recovers it
        apply(pool, actor, report)

    monkeypatch.setattr(gen._Pool, "_apply", lose_the_first_report)
    manifest = gen.generate(cfg)
    assert lost, "no report carried a shard"
    assert manifest["actor_restarts"] == 1
    assert set(lost) <= {p.name for p in _shards(run_dir)}  # kept, not removed and redone
    recovered = re.findall(r"(\d+) unreported shard\(s\) recovered",
                           _read(run_dir / "logs" / "generate.log"))
    assert recovered and int(recovered[0]) >= len(lost), recovered
    _check_complete(run_dir)  # every seed written exactly once
    assert _pair_ids(run_dir) == reference
