"""One process per run folder: ``<run_dir>/.lock``, taken by ``generate`` and ``train``.

Two runs writing into one folder would interleave shards, manifests and checkpoints (and
``overwrite=true`` would delete a folder another process is writing). So each run takes the
folder's lock first and releases it when it ends, also on an exception or Ctrl-C.

The lock file holds JSON: the holder's pid, host, boot id, process start time (clock ticks
since boot, from ``/proc/<pid>/stat``), when it was taken and the command line. It is created
whole and atomically: written under a temporary name, then hard-linked to ``.lock`` (``link``
fails if the name exists, like ``open(O_CREAT | O_EXCL)``, and a reader never sees a half-written
lock, even if the writer dies between the create and the write).

A lock left by a process that no longer runs (killed with SIGKILL, a machine that rebooted) is
stale: on the same host (and boot) it is taken over with a warning when its pid is dead or is
now another process (its start time differs). A lock from another host cannot be checked and
is refused with the command that removes it. Acquiring, taking over and releasing are
serialised on this host by an ``flock`` on the run folder, so two processes cannot both take
over one stale lock; the kernel drops that ``flock`` when a process dies, so it never goes
stale itself.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLocked(FileExistsError):
    """The run folder is held by another process; the message names it and says what to do."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or None
    when there is no such process (or no ``/proc``). With the pid it names one process: a pid
    reused by a later process has a later start."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _me(command: str | None) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "start": process_start(pid),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": command if command is not None else " ".join(sys.argv),
    }


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (since "
            f"{holder.get('since')}; command: {holder.get('command')})")


def stale_reason(holder: dict[str, Any]) -> str | None:
    """Why the lock ``holder`` is stale (its process is gone), or None when it may be alive or
    cannot be checked from here (another host)."""
    if holder.get("host") != socket.gethostname() or "pid" not in holder:
        return None
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return "this host has rebooted since the lock was taken"
    pid = int(holder["pid"])
    if not _pid_alive(pid):
        return f"process {pid} is not running"
    start = process_start(pid)
    if holder.get("start") and start and start != holder["start"]:
        return f"pid {pid} is now another process (it started at a different time)"
    return None


def _refusal(run_dir: Path, holder: dict[str, Any]) -> RunLocked:
    lock = run_dir / LOCK_FILE
    if "pid" not in holder or "host" not in holder:
        return RunLocked(
            f"{run_dir} holds a lock file that names no process ({lock}); if no other run uses "
            f"this folder, remove it (rm {lock}) and run the command again")
    if holder.get("host") != socket.gethostname():
        return RunLocked(
            f"{run_dir} is in use by {_describe(holder)}, another host, which this machine "
            f"cannot check; wait for that run to end, or if it is really gone, remove the lock "
            f"(rm {lock}) and run the command again")
    return RunLocked(
        f"{run_dir} is in use by {_describe(holder)}; wait for it to end or stop it (kill "
        f"{holder.get('pid')}), or choose another run_name")


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's content; None when there is no lock, {} when it is not a lock we wrote."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


@contextmanager
def _folder_mutex(run_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the run folder, for this host's lock operations."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def acquire(run_dir: Path, command: str | None = None) -> dict[str, Any]:
    """Take ``run_dir``'s lock (creating the folder), taking over a stale one; returns what
    the lock file records. Raises :class:`RunLocked` when another live process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    me = _me(command)
    tmp = run_dir / f".lock.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(me))
    try:
        with _folder_mutex(run_dir):
            while True:
                try:
                    os.link(tmp, lock)  # atomic: fails if the lock exists
                    return me
                except FileExistsError:
                    pass
                holder = _read(lock)
                if holder is None:
                    continue  # released meanwhile (by a holder on another host)
                reason = stale_reason(holder)
                if reason is None:
                    raise _refusal(run_dir, holder)
                log.warning("taking over the stale lock of %s (%s): %s", run_dir,
                            _describe(holder), reason)
                lock.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)


def release(run_dir: Path) -> None:
    """Remove ``run_dir``'s lock if this process holds it (never another process's)."""
    lock = run_dir / LOCK_FILE
    if not run_dir.is_dir():
        return
    with _folder_mutex(run_dir):
        holder = _read(lock)
        if holder is not None and holder.get("pid") == os.getpid() and \
                holder.get("host") == socket.gethostname():
            lock.unlink()


@contextmanager
def hold(run_dir: Path, command: str | None = None) -> Iterator[dict[str, Any]]:
    """``with hold(run_dir):`` the block runs holding the folder's lock, released on any exit
    (return, exception, KeyboardInterrupt)."""
    holder = acquire(run_dir, command)
    try:
        yield holder
    finally:
        release(run_dir)


def clear_run_dir(run_dir: Path) -> None:
    """Delete everything in ``run_dir`` but its lock (``overwrite=true`` while holding it)."""
    for entry in run_dir.iterdir():
        if _is_lock_file(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def is_empty_but_lock(run_dir: Path) -> bool:
    """True when ``run_dir`` holds nothing but (possibly) its lock: a new run's folder."""
    return all(_is_lock_file(entry.name) for entry in run_dir.iterdir())


def _is_lock_file(name: str) -> bool:
    """The lock, or a lock being written under its temporary name (by any process)."""
    return name == LOCK_FILE or (name.startswith(LOCK_FILE + ".") and name.endswith(".tmp"))
