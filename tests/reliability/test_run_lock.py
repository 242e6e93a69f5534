"""Two runs, one folder: ``generate`` and ``train`` take ``<run_dir>/.lock`` and refuse a
folder another live process holds, naming it; a stale lock (its process is gone) is taken
over with a warning; a lock from another host is refused with how to remove it.

The holder is a real second process (``python -c`` that takes the lock and sleeps); the runs
are the real CLI or the real ``generate``/``train`` functions. None of these tests starts Ray
or loads a model: each run is refused (or stops on another check) before that.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecd_ray import runlock
from ecd_ray.config import SAMPLE_SEEDS, load_config, load_train_config
from ecd_ray.pipeline.generate import generate
from ecd_ray.train.trainer import train

HOLD = """
import sys, time
from pathlib import Path
from ecd_ray import runlock
runlock.acquire(Path(sys.argv[1]), command="holder-for-test")
print("locked", flush=True)
time.sleep(120)
"""


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "ecd-ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ecd_ray.cli"]


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A real process holding the lock of ``tmp_path/out/a``; killed (by its pid) at the end."""
    run_dir = tmp_path / "out" / "a"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc, run_dir
    finally:
        proc.kill()
        proc.wait()


def _gen_args(tmp_path: Path, *extra: str) -> list[str]:
    model = tmp_path / "model"  # config load checks only that the folder exists
    model.mkdir(exist_ok=True)
    return [f"output_dir={tmp_path / 'out'}", "run_name=a", f"seeds.path={SAMPLE_SEEDS}",
            f"teacher.model={model}", "teacher.engine=transformers", *extra]


def _train_args(tmp_path: Path, *extra: str) -> list[str]:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    pairs = tmp_path / "pairs"
    pairs.mkdir(exist_ok=True)
    pq.write_table(pa.table({"x": [1]}), pairs / "p.parquet")
    return [f"output_dir={tmp_path / 'out'}", "run_name=a", f"pairs={pairs}",
            f"model={model}", *extra]


@pytest.mark.parametrize("command", ["generate", "train"])
def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder(
        tmp_path: Path, holder: tuple[subprocess.Popen[str], Path], command: str) -> None:
    proc, run_dir = holder
    (run_dir / "sentinel").write_text("the holder's work")
    args = _gen_args(tmp_path) if command == "generate" else _train_args(tmp_path)
    for extra in ([], ["overwrite=true"]):  # overwrite must not delete a folder in use
        out = subprocess.run([*_cli(), command, *args, *extra], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"pid {proc.pid} on host {socket.gethostname()}" in out.stderr, out.stderr
        assert "holder-for-test" in out.stderr and "Traceback" not in out.stderr
        assert (run_dir / "sentinel").read_text() == "the holder's work"
    assert json.loads((run_dir / runlock.LOCK_FILE).read_text())["pid"] == proc.pid


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir: Path, **fields: object) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    base = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": runlock._boot_id(),
            "start": runlock.process_start(os.getpid()), "command": "an earlier run"}
    (run_dir / runlock.LOCK_FILE).write_text(json.dumps({**base, **fields}))


def test_a_stale_lock_of_a_killed_run_is_taken_over_by_generate(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "out" / "a"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.send_signal(signal.SIGKILL)  # no finally runs: the lock stays behind
    proc.wait()
    assert json.loads((run_dir / runlock.LOCK_FILE).read_text())["pid"] == proc.pid
    # An unfinished run of another config: generate takes the lock over, then refuses to
    # resume (a check that comes after the lock and before Ray), and releases the lock.
    (run_dir / "manifest.json").write_text(json.dumps({"status": "running",
                                                       "config_hash": "another"}))
    cfg = load_config(None, _gen_args(tmp_path))
    with caplog.at_level(logging.WARNING), pytest.raises(FileExistsError,
                                                         match="different config"):
        generate(cfg)
    assert f"taking over the stale lock of {run_dir}" in caplog.text
    assert f"process {proc.pid} is not running" in caplog.text
    assert not (run_dir / runlock.LOCK_FILE).exists()  # released after the exception


def test_a_lock_whose_pid_is_now_another_process_is_stale(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "a"
    _write_lock(run_dir, start="1")  # a live pid, but not the process that took the lock
    with caplog.at_level(logging.WARNING):
        runlock.acquire(run_dir)
    assert "is now another process" in caplog.text
    assert json.loads((run_dir / runlock.LOCK_FILE).read_text())["start"] == \
        runlock.process_start(os.getpid())
    runlock.release(run_dir)
    assert not (run_dir / runlock.LOCK_FILE).exists()
    _write_lock(run_dir, pid=_dead_pid())
    caplog.clear()
    with caplog.at_level(logging.WARNING), runlock.hold(run_dir):
        assert "is not running" in caplog.text


def test_a_live_lock_of_this_process_is_not_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "a"
    _write_lock(run_dir)  # this very process, same start time: alive
    with pytest.raises(runlock.RunLocked, match=f"pid {os.getpid()}"):
        runlock.acquire(run_dir)


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "out" / "a"
    _write_lock(run_dir, pid=_dead_pid(), host="some-other-host")
    out = subprocess.run([*_cli(), "generate", *_gen_args(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "on host some-other-host" in out.stderr and "cannot check" in out.stderr
    assert f"rm {run_dir / runlock.LOCK_FILE}" in out.stderr
    assert (run_dir / runlock.LOCK_FILE).exists()


def test_an_unreadable_lock_is_refused_not_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "a"
    run_dir.mkdir()
    (run_dir / runlock.LOCK_FILE).write_text("not json")
    with pytest.raises(runlock.RunLocked, match="names no process"):
        runlock.acquire(run_dir)


def test_the_lock_is_released_after_an_exception_and_ctrl_c(tmp_path: Path) -> None:
    # generate: a finished run is refused after the lock is taken
    run_dir = tmp_path / "out" / "a"
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text(json.dumps({"status": "complete"}))
    with pytest.raises(FileExistsError, match="complete run"):
        generate(load_config(None, _gen_args(tmp_path)))
    assert not (run_dir / runlock.LOCK_FILE).exists()
    # train: a finished training run is refused after the lock is taken
    (run_dir / "train_summary.json").write_text("{}")
    with pytest.raises(FileExistsError, match="finished training run"):
        train(load_train_config(None, _train_args(tmp_path)))
    assert not (run_dir / runlock.LOCK_FILE).exists()
    # Ctrl-C inside the locked block
    with pytest.raises(KeyboardInterrupt), runlock.hold(run_dir):
        assert (run_dir / runlock.LOCK_FILE).exists()
        raise KeyboardInterrupt
    assert not (run_dir / runlock.LOCK_FILE).exists()


def test_racing_acquirers_get_the_lock_one_at_a_time(tmp_path: Path) -> None:
    """Eight processes, released at the same instant, try a stale lock: exactly one wins."""
    run_dir, go = tmp_path / "a", tmp_path / "go"
    _write_lock(run_dir, pid=_dead_pid())
    code = ("import sys, time\nfrom pathlib import Path\nfrom ecd_ray import runlock\n"
            "print('ready', flush=True)\n"
            "while not Path(sys.argv[2]).exists():\n    time.sleep(0.0005)\n"
            "try:\n    runlock.acquire(Path(sys.argv[1]))\n    print('won', flush=True)\n"
            "    time.sleep(60)\nexcept runlock.RunLocked:\n    print('refused', flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(go)],
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 8
        go.touch()
        results = [p.stdout.readline().strip() for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert sorted(results) == ["refused"] * 7 + ["won"], results
