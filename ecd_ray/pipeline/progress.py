"""One live progress line for long generation runs: seeds done, chains in flight, tokens/s,
rejects (seed rows, and chains that stopped early), engine restarts, ETA.

On a terminal the line is redrawn in place about once a second; elsewhere (CI, log files,
``ray job logs``) a full line is printed every ``plain_interval_s`` seconds.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Counters of a generation run and their rendering; ``update`` draws when due."""

    def __init__(self, total: int, done: int = 0, seed_rejects: int = 0,
                 stream: TextIO | None = None, plain_interval_s: float = 15.0):
        self.total = total
        self.done = done
        self.done_at_start = done
        self.seed_rejects = seed_rejects
        self.stopped_early = 0
        self.restarts = 0
        self.in_flight = 0
        self.tokens = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 1.0 if self.tty else plain_interval_s
        self.started = time.monotonic()
        self.ready_at: float | None = None
        self._last_draw = 0.0

    def engines_ready(self) -> None:
        self.ready_at = time.monotonic()
        self.draw(force=True)

    def add_done(self, n: int, stopped_early: int = 0) -> None:
        self.done += n
        self.stopped_early += stopped_early
        self.draw()

    def update(self, *, in_flight: int, tokens: int) -> None:
        self.in_flight = in_flight
        self.tokens = tokens
        self.draw()

    def line(self) -> str:
        now = time.monotonic()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"seeds {self.done}/{self.total} ({pct:.0f}%)",
                 f"in flight {self.in_flight}"]
        if self.ready_at is None:
            parts.append(f"starting engines {_duration(now - self.started)}")
        else:
            elapsed = max(now - self.ready_at, 1e-9)
            parts.append(f"{self.tokens / elapsed:.0f} tok/s")
            rate = (self.done - self.done_at_start) / elapsed
            left = self.total - self.done
            parts.append(f"ETA {_duration(left / rate)}" if rate > 0 and left else
                         f"elapsed {_duration(elapsed)}")
        parts.append(f"rejects {self.seed_rejects} seeds + {self.stopped_early} chains "
                     "stopped early")
        if self.restarts:
            parts.append(f"engine restarts {self.restarts}")
        return "generate: " + " | ".join(parts)

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.draw(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
