"""A full disk mid-run: the run stops with an error naming the folder and "no space left",
leaves a resumable state (every shard on disk whole and matching its hash, no half shard under
a real name, the manifest not ``complete``), and the same command, once there is space again,
finishes with the pairs of an uninterrupted run, every seed written exactly once.

Two ways to a real ENOSPC from the kernel, with no hook in the production code:

* a small tmpfs holds the run folder and is filled up once the first shard is on disk (needs
  permission to mount: root, or a container that allows it; skipped with the reason if not);
* ``/dev/full`` (every write fails with ENOSPC): the names the next shards' temporary files
  will have (the actor's index, incarnation and sequence number, read off the first shard's
  name) are made symlinks to it, and so is the manifest's temporary file.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from reliability_runs import (
    N_SEEDS,
    check_complete,
    finish,
    kill_group,
    pairs,
    run_args,
    start,
    wait_for,
)

from ecd_ray import runlock
from ecd_ray.pipeline import manifest as mf


def _shards(run_dir: Path) -> list[Path]:
    return mf.shards(run_dir / "evolutions")


def _check_stopped_resumable(run_dir: Path, log: Path) -> list[Path]:
    """What a run stopped by a full disk must leave; returns the shards it left."""
    out = log.read_text(errors="replace")
    assert "no space left" in out and str(run_dir) in out, out[-3000:]
    assert "Traceback" not in out.split("error: no space left")[-1]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] != "complete"
    left = _shards(run_dir)
    for shard in left:  # whole, and exactly what was recorded when it was written
        assert mf.shard_problem(shard) is None, shard
    assert not (run_dir / runlock.LOCK_FILE).exists()
    return left


def _resume_and_compare(args: list[str], run_dir: Path, log: Path, before: list[Path],
                        expected: list[dict[str, Any]]) -> None:
    proc = start(args, log)
    assert finish(proc) == 0, log.read_text(errors="replace")[-3000:]
    check_complete(run_dir)  # every seed exactly once: none lost, none doubled
    after = {p.name for p in _shards(run_dir)}
    assert {p.name for p in before} <= after  # nothing written before the stop was redone
    assert pairs(run_dir) == expected


def _fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its filesystem is full; returns the filler file."""
    filler = folder / "filler"
    block = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    for size in (1 << 16, 4096, 1):  # the last pages, too
        try:
            with filler.open("ab", buffering=0) as fh:
                while True:
                    fh.write(b"\0" * size)
        except OSError:
            pass
    return filler


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, unmounted at the end."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the /dev/full test covers ENOSPC instead")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): "
                    "the /dev/full test covers ENOSPC instead")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_full_filesystem_mid_run_stops_cleanly_and_resumes(
        small_fs: Path, tmp_path: Path, tiny_model: Path,
        uninterrupted_run: tuple[Path, list[dict[str, Any]]]) -> None:
    args = run_args(small_fs, tiny_model, "d")
    run_dir = small_fs / "d"
    proc = start(args, tmp_path / "d1.log")
    try:
        wait_for(lambda: _shards(run_dir), 240, "a first shard")
        filler = _fill(small_fs)
        full_at = time.monotonic()
        rc = proc.wait(timeout=120)
        stopped_in = time.monotonic() - full_at
    finally:
        kill_group(proc)
        proc.wait()
    assert rc == 1, (tmp_path / "d1.log").read_text()[-3000:]
    before = _check_stopped_resumable(run_dir, tmp_path / "d1.log")
    written = sum(pq.read_metadata(s).num_rows for s in before)
    assert 0 < written < N_SEEDS
    print(f"disk full after {len(before)} shard(s) ({written} seeds): stopped in "
          f"{stopped_in:.1f} s")
    filler.unlink()
    _resume_and_compare(args, run_dir, tmp_path / "d2.log", before, uninterrupted_run[1])


@pytest.mark.slow
def test_enospc_on_a_shard_and_on_the_manifest_stops_cleanly_and_resumes(
        tmp_path: Path, tiny_model: Path,
        uninterrupted_run: tuple[Path, list[dict[str, Any]]]) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    args = run_args(tmp_path, tiny_model, "f")
    run_dir = tmp_path / "f"
    evolutions = run_dir / "evolutions"
    proc = start(args, tmp_path / "f1.log")
    planted: list[Path] = []
    try:
        first = wait_for(lambda: _shards(run_dir), 240, "a first shard")[0].name
        prefix = first.rsplit("-", 1)[0]  # part-<actor>-<incarnation>
        for seq in range(1, 100):
            link = evolutions / f".{prefix}-{seq:06d}.parquet.tmp"
            try:
                link.symlink_to("/dev/full")
                planted.append(link)
            except FileExistsError:
                pass  # being written right now: the next one fails
        full_at = time.monotonic()
        rc = proc.wait(timeout=120)
        stopped_in = time.monotonic() - full_at
    finally:
        kill_group(proc)
        proc.wait()
    assert rc == 1, (tmp_path / "f1.log").read_text()[-3000:]
    before = _check_stopped_resumable(run_dir, tmp_path / "f1.log")
    written = sum(pq.read_metadata(s).num_rows for s in before)
    assert 0 < written < N_SEEDS
    print(f"ENOSPC at shard {len(before) + 1} ({written} seeds written): stopped in "
          f"{stopped_in:.1f} s")
    for link in planted:
        link.unlink(missing_ok=True)
    # The driver's own write: the manifest, the first thing a resumed run writes.
    (run_dir / "manifest.tmp").symlink_to("/dev/full")
    proc = start(args, tmp_path / "f2.log")
    assert finish(proc) == 1, (tmp_path / "f2.log").read_text()[-3000:]
    assert _check_stopped_resumable(run_dir, tmp_path / "f2.log") == before
    assert not (run_dir / "manifest.tmp").is_symlink()  # the failed write cleaned up after it
    _resume_and_compare(args, run_dir, tmp_path / "f3.log", before, uninterrupted_run[1])


def test_no_space_raised_by_a_driver_write_is_recorded_in_the_manifest(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver-side write that finds no space, where the manifest still can be written (the
    seed rejects, the pairs: another folder or device than the manifest's, or space freed in
    between): the run stops with DiskFull and the manifest says ``failed`` with the cause.
    The write is made to fail at its function boundary (no Ray is started)."""
    from ecd_ray.config import load_config
    from ecd_ray.pipeline import generate as gen

    def full(cfg: Any) -> tuple[int, int]:
        raise OSError(errno.ENOSPC, "No space left on device",
                      str(cfg.run_dir / "rejects" / "seeds" / "part-00000.parquet"))

    monkeypatch.setattr(gen, "_write_seed_rejects", full)
    cfg = load_config(None, run_args(tmp_path, tiny_model, "g"))
    with pytest.raises(gen.DiskFull, match="no space left") as err:
        gen.generate(cfg)
    assert str(cfg.run_dir) in str(err.value) and "resumable" in str(err.value)
    manifest = json.loads((cfg.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert "No space left on device" in manifest["error"]
    assert not (cfg.run_dir / runlock.LOCK_FILE).exists()
