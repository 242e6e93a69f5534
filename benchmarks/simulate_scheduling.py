"""SIMULATION of chain scheduling: the real ChainScheduler and Chain over a simulated engine.

    python benchmarks/simulate_scheduling.py                   # 10,000 seeds, 256 slots
    python benchmarks/simulate_scheduling.py --seeds 2000 --max-num-seqs 64
    python benchmarks/simulate_scheduling.py --lengths-from out/demo       # a run's answers
    python benchmarks/simulate_scheduling.py --write-lengths /tmp/simlen/l  # make the default

Nothing here runs a model and no time is measured: this is a model of a GPU engine, not a
benchmark. Only the engine is replaced: :class:`SimEngine` implements the AsyncEngine
protocol (``capacity``, ``agenerate``) over a VIRTUAL clock. One engine step advances every
running sequence by one token and costs one time unit however many sequences run (a GPU's
decode step is flat up to ``max_num_seqs``); at most ``max_num_seqs`` run, the others wait in
a FIFO queue; prefill costs nothing. Each request's answer length is drawn (an RNG seeded by
the request id) from measured answer lengths (completion tokens of a real run).

The scheduling is the real one: :class:`ecd_ray.scheduler.ChainScheduler` in continuous mode
(``max_chains`` = 2 x capacity, its default, and = capacity) and in lock-step mode (batches of
16, 64, 256), driving real :class:`ecd_ray.evolution.Chain` state machines (template
evolution, 3 rounds: 4 answer requests per chain).

Reported per configuration: virtual time (engine steps), the mean fraction of engine slots
busy, tokens per step and the speed-up over lock-step batches of 16. Results:
benchmarks/results/scheduling_simulation.json and scheduling_simulation.png.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import json
import platform
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ecd_ray.config import SAMPLE_SEEDS, EvolutionConfig
from ecd_ray.engines.base import ChatRequest, GenerationResult, Sampling
from ecd_ray.evolution import Chain, ChainSettings
from ecd_ray.scheduler import ChainScheduler, Mode

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_LENGTHS = RESULTS / "answer_lengths.json"
LABEL = "SIMULATION (virtual clock, simulated engine; no model runs)"


# ---------------------------------------------------------------------------------------------
# Answer lengths


def lengths_from(path: Path) -> list[int]:
    """Completion tokens of every answered level of a run (its folder, its ``evolutions/``
    folder or one shard), or the list in a JSON file (a list, or an object with ``lengths``)."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        values = data["lengths"] if isinstance(data, dict) else data
    else:
        import pyarrow.parquet as pq

        if path.is_dir():
            folder = path / "evolutions" if (path / "evolutions").is_dir() else path
            files = sorted(folder.glob("*.parquet"))
        else:
            files = [path]
        if not files:
            raise SystemExit(f"error: no evolutions/*.parquet under {path}")
        values = []
        for f in files:
            for levels in pq.read_table(f, columns=["levels"])["levels"].to_pylist():
                values += [lvl["completion_tokens"] for lvl in levels
                           if lvl.get("response_source") == "teacher"
                           and lvl.get("completion_tokens")]
    lengths = [int(v) for v in values if v is not None and int(v) > 0]
    if not lengths:
        raise SystemExit(f"error: {path} holds no answer lengths (completion_tokens > 0)")
    return lengths


LENGTHS_COMMAND = ".venv/bin/ecd-ray generate seeds.limit=32 rounds=3 output_dir=/tmp/simlen " \
                  "run_name=l"


def write_lengths(run_dir: Path, out: Path, command: str = LENGTHS_COMMAND) -> dict[str, Any]:
    """``answer_lengths.json`` from a finished run, with where the lengths came from
    (``command``: the command line that made the run; the manifest does not record it)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    cfg = manifest["config"]
    engines = manifest.get("engines") or [{}]
    record = {
        "what": "completion tokens of every answered level of one real generation run; the "
                "answer-length distribution of simulate_scheduling.py",
        "command": command,
        "model": cfg["teacher"]["model"],
        "engine": engines[0].get("engine"),
        "dtype": engines[0].get("dtype"),
        "max_new_tokens": cfg["teacher"]["max_new_tokens"],
        "temperature": cfg["teacher"]["temperature"],
        "rounds": cfg["rounds"],
        "evolution_mode": cfg["evolution"]["mode"],
        "seeds": manifest.get("counts", {}).get("seeds_valid"),
        "cpu": manifest.get("cpu"),
        "versions": manifest.get("versions"),
        "date": datetime.fromtimestamp(manifest.get("started", time.time()),
                                       timezone.utc).isoformat(timespec="seconds"),
    }
    lengths = lengths_from(run_dir)
    record |= {"n": len(lengths), "mean": round(sum(lengths) / len(lengths), 1),
               "at_max_new_tokens": sum(n >= cfg["teacher"]["max_new_tokens"]
                                        for n in lengths),
               "lengths": lengths}
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record | {"lengths": "@"}, indent=1)  # the list on one line
    out.write_text(text.replace('"@"', json.dumps(lengths)))
    return record


# ---------------------------------------------------------------------------------------------
# The simulated engine


def _rng(seed: int, request_id: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


@dataclass
class _Seq:
    future: asyncio.Future[GenerationResult]
    length: int
    max_new_tokens: int


@dataclass
class SimEngine:
    """An AsyncEngine over a virtual clock: ``max_num_seqs`` slots, one token per running
    sequence per step, one time unit per step however many run.

    ``agenerate`` queues the request and awaits its future. A stepper task lets the event loop
    run until no new request arrives for ``settle_yields`` consecutive yields (so chains whose
    request just finished have submitted their next one), then admits waiting requests up to
    ``max_num_seqs`` (FIFO) and runs steps. Between two completions nothing can change, so the
    stepper jumps straight to the next completion (the same result as stepping one by one).
    ``trace`` holds (virtual time, busy slots) at every change; ``tokens`` counts the tokens
    of finished requests (every step adds one per busy slot, so it equals ``busy_integral``
    once all requests have finished).
    """

    max_num_seqs: int = 256
    lengths: Sequence[int] = (128,)
    seed: int = 0
    settle_yields: int = 8
    model_name: str = "sim-engine"
    now: int = 0  # virtual time, in engine steps
    busy_integral: int = 0  # sum over steps of busy slots
    tokens: int = 0
    requests: int = 0
    max_waiting: int = 0
    trace: list[tuple[int, int]] = field(default_factory=list)
    _waiting: deque[_Seq] = field(default_factory=deque)
    _running: list[tuple[int, int, _Seq]] = field(default_factory=list)  # heap: (end, n, seq)
    _admitted: int = 0
    _stepper: asyncio.Task[None] | None = None

    @property
    def capacity(self) -> int:
        return self.max_num_seqs

    def length_of(self, request: ChatRequest) -> int:
        if len(self.lengths) == 1:
            return self.lengths[0]
        return _rng(self.seed, request.request_id).choice(self.lengths)

    async def agenerate(self, request: ChatRequest) -> GenerationResult:
        cap = request.sampling.max_new_tokens
        n = min(self.length_of(request), cap)
        fut: asyncio.Future[GenerationResult] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Seq(fut, n, cap))
        self.requests += 1
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.create_task(self._run())
        return await fut

    async def _settle(self) -> None:
        """Yield to the loop until ``settle_yields`` yields in a row bring no new request."""
        quiet = 0
        seen = self.requests
        while quiet < self.settle_yields:
            await asyncio.sleep(0)
            if self.requests == seen:
                quiet += 1
            else:
                seen, quiet = self.requests, 0

    async def _run(self) -> None:
        try:
            await self._steps()
        except BaseException as exc:  # a stepper bug must fail the requests, not hang them
            for s in [*(r[2] for r in self._running), *self._waiting]:
                if not s.future.done():
                    s.future.set_exception(exc)
            raise

    async def _steps(self) -> None:
        while True:
            await self._settle()
            if not self._waiting and not self._running:
                return  # idle: the next agenerate starts a new stepper
            self.max_waiting = max(self.max_waiting, len(self._waiting))
            while self._waiting and len(self._running) < self.max_num_seqs:
                s = self._waiting.popleft()
                self._admitted += 1  # ties: the earlier admission first (FIFO)
                heapq.heappush(self._running, (self.now + s.length, self._admitted, s))
            busy = len(self._running)
            self._mark(busy)
            # Nothing is admitted or freed before the next completion: jump to it, as
            # stepping one token at a time would get there.
            end = self._running[0][0]
            self.busy_integral += (end - self.now) * busy
            self.now = end
            while self._running and self._running[0][0] == end:
                s = heapq.heappop(self._running)[2]
                self.tokens += s.length
                if not s.future.cancelled():
                    s.future.set_result(GenerationResult(
                        f"simulated answer of {s.length} tokens", 0, s.length,
                        "length" if s.length >= s.max_new_tokens else "stop"))
            if not self._running and not self._waiting:
                self._mark(0)

    def _mark(self, busy: int) -> None:
        """Record a change of busy slots (a change of zero duration replaces the last)."""
        if self.trace and self.trace[-1][0] == self.now:
            self.trace.pop()
        if not self.trace or self.trace[-1][1] != busy:
            self.trace.append((self.now, busy))

    def close(self) -> None:
        if self._stepper is not None:
            self._stepper.cancel()


# ---------------------------------------------------------------------------------------------
# One configuration


def sim_seeds(n: int) -> list[dict[str, Any]]:
    """``n`` seed rows: the bundled sample's instructions, cycled, with unique ids."""
    texts = [json.loads(line)["instruction"]
             for line in SAMPLE_SEEDS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"seed_id": f"sim-{i:06d}", "source": "simulation", "instruction": texts[i % len(
        texts)], "response": None} for i in range(n)]


def chain_settings(rounds: int, seed: int = 0, max_new_tokens: int = 256) -> ChainSettings:
    return ChainSettings.build(EvolutionConfig(mode="template"), rounds=rounds, seed=seed,
                               answer=Sampling(max_new_tokens=max_new_tokens))


@dataclass
class SimResult:
    name: str
    mode: str
    batch_size: int | None
    max_chains: int | None
    virtual_steps: int
    busy_fraction: float
    tokens: int
    tokens_per_step: float
    requests: int
    chains: int
    levels_per_chain: dict[int, int]
    stop_reasons: dict[str, int]
    max_waiting: int
    wall_s: float
    trace: list[tuple[int, int]] = field(repr=False, default_factory=list)

    def row(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "trace"}
        out["levels_per_chain"] = {str(k): v for k, v in self.levels_per_chain.items()}
        return out


def simulate(name: str, *, mode: Mode, seeds: int, lengths: Sequence[int], rounds: int = 3,
             max_num_seqs: int = 256, batch_size: int = 16, max_chains: int | None = None,
             seed: int = 0, settle_yields: int = 8) -> SimResult:
    """Run ``seeds`` chains through the real scheduler over a :class:`SimEngine`."""
    engine = SimEngine(max_num_seqs=max_num_seqs, lengths=list(lengths), seed=seed,
                       settle_yields=settle_yields)
    settings = chain_settings(rounds, seed, max(lengths))
    done: list[Chain] = []

    async def main() -> ChainScheduler:
        sched = ChainScheduler(engine, settings, mode=mode, max_chains=max_chains,
                               batch_size=batch_size, clock=lambda: float(engine.now))
        await sched.run(sim_seeds(seeds), done.append)
        engine.close()
        return sched

    t0 = time.perf_counter()
    sched = asyncio.run(main())
    wall = time.perf_counter() - t0
    levels: dict[int, int] = {}
    stops: dict[str, int] = {}
    for c in done:
        n = sum(lvl["response"] is not None for lvl in c.levels)
        levels[n] = levels.get(n, 0) + 1
        stops[c.stop_reason or "none"] = stops.get(c.stop_reason or "none", 0) + 1
    if not sched.stats.completion_tokens == engine.tokens == engine.busy_integral:
        raise RuntimeError(f"{name}: the scheduler counted {sched.stats.completion_tokens} "
                           f"tokens, the engine {engine.tokens} in {engine.busy_integral} "
                           "busy slot-steps")
    steps = engine.now
    return SimResult(
        name=name, mode=mode, batch_size=batch_size if mode == "lockstep" else None,
        max_chains=sched.max_chains if mode == "continuous" else None,
        virtual_steps=steps,
        busy_fraction=round(engine.busy_integral / (max_num_seqs * steps), 6) if steps else 0.0,
        tokens=engine.tokens, tokens_per_step=round(engine.tokens / steps, 2) if steps else 0.0,
        requests=engine.requests, chains=len(done), levels_per_chain=dict(sorted(levels.items())),
        stop_reasons=stops, max_waiting=engine.max_waiting, wall_s=round(wall, 2),
        trace=engine.trace)


def configurations(cap: int) -> list[dict[str, Any]]:
    return [
        {"name": f"continuous, max_chains={2 * cap} (2x capacity, default)",
         "mode": "continuous", "max_chains": 2 * cap},
        {"name": f"continuous, max_chains={cap} (= capacity)", "mode": "continuous",
         "max_chains": cap},
        {"name": "lockstep, batch 16", "mode": "lockstep", "batch_size": 16},
        {"name": "lockstep, batch 64", "mode": "lockstep", "batch_size": 64},
        {"name": "lockstep, batch 256", "mode": "lockstep", "batch_size": 256},
    ]


# ---------------------------------------------------------------------------------------------
# Output


def binned(trace: list[tuple[int, int]], end: int, bins: int) -> list[tuple[float, float]]:
    """Time-weighted mean busy slots in ``bins`` equal windows of [0, end)."""
    if end <= 0:
        return []
    width = end / bins
    acc = [0.0] * bins
    pts = trace + [(end, 0)]
    for (t0, busy), (t1, _) in zip(pts, pts[1:], strict=False):
        t0, t1 = min(t0, end), min(t1, end)
        b = int(t0 // width)
        while t0 < t1 and b < bins:
            edge = min(t1, (b + 1) * width)
            acc[b] += busy * (edge - t0)
            t0, b = edge, b + 1
    return [(round((i + 0.5) * width, 1), round(a / width, 2)) for i, a in enumerate(acc)]


def window(trace: list[tuple[int, int]], end: int) -> list[tuple[int, int]]:
    """The trace's change points before ``end``."""
    return [(t, b) for t, b in trace if t < end]


def plot(record: dict[str, Any], traces: dict[str, list[tuple[int, int]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["results"]
    cap = record["settings"]["max_num_seqs"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 8))
    names = [f"continuous\nmax_chains={r['max_chains']}" if r["mode"] == "continuous"
             else f"lock-step\nbatch {r['batch_size']}" for r in rows]
    occ = [100 * r["busy_fraction"] for r in rows]
    ax1.barh(names, occ, color=["tab:green" if r["mode"] == "continuous" else "tab:gray"
                                for r in rows])
    for i, r in enumerate(rows):
        ax1.text(occ[i], i, f" {occ[i]:.1f}%   {r['virtual_steps']:,} steps   "
                 f"{r['speedup_vs_lockstep16']:.1f}x vs lock-step 16", va="center", fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 160)
    ax1.set_xticks(range(0, 101, 20))
    ax1.set_xlabel(f"mean engine slots busy (% of max_num_seqs={cap})")
    s = record["settings"]
    fig.suptitle(f"SIMULATION (virtual clock, not a measurement): {s['seeds']:,} seeds, "
                 f"rounds={s['rounds']}, engine step cost flat up to max_num_seqs={cap}",
                 fontsize=10)
    ax1.set_title(f"slot occupancy per scheduling; answer lengths: "
                  f"{record['answer_lengths']['n']} measured (mean "
                  f"{record['answer_lengths']['mean']} tokens)", fontsize=9)
    horizon = record["trace_window_steps"]
    for key, color in traces.items():
        pts = window(record["traces"][key], horizon)
        if not pts:
            continue
        xs = [t for t, _ in pts] + [horizon]
        ys = [b for _, b in pts] + [pts[-1][1]]
        ax2.step(xs, ys, where="post", label=key, color=color)
    ax2.axhline(cap, color="k", ls="--", lw=0.8, label=f"max_num_seqs={cap}")
    ax2.set_xlim(0, horizon)
    ax2.set_xlabel("virtual time (engine steps)")
    ax2.set_ylabel("sequences running")
    ax2.set_ylim(0, cap * 1.15)
    ax2.set_title(f"sequences running over the first {horizon:,} virtual steps", fontsize=9)
    ax2.legend(fontsize=8, loc="upper right", ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'configuration':<50} {'virtual steps':>13} {'slots busy':>10} "
            f"{'tokens/step':>11} {'speed-up':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<50} {r['virtual_steps']:>13,} {r['busy_fraction']:>10.1%} "
                     f"{r['tokens_per_step']:>11.1f} {r['speedup_vs_lockstep16']:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--lengths-from", type=Path, default=None,
                    help="a run folder, its evolutions/ folder or shard, or a JSON list "
                         f"(default: {DEFAULT_LENGTHS.relative_to(HERE.parent)})")
    ap.add_argument("--seed", type=int, default=0, help="seeds the answer-length draws")
    ap.add_argument("--out", type=Path, default=RESULTS / "scheduling_simulation.json",
                    help="the JSON result; the plot goes next to it (.png)")
    ap.add_argument("--trace-window", type=int, default=4000,
                    help="virtual steps of the occupancy-over-time plot")
    ap.add_argument("--write-lengths", type=Path, default=None, metavar="RUN_DIR",
                    help=f"write {DEFAULT_LENGTHS.name} from a finished run and exit")
    ap.add_argument("--lengths-command", default=LENGTHS_COMMAND,
                    help="with --write-lengths: the command line that made RUN_DIR")
    args = ap.parse_args(argv)

    if args.write_lengths is not None:
        rec = write_lengths(args.write_lengths, DEFAULT_LENGTHS, args.lengths_command)
        print(f"wrote {DEFAULT_LENGTHS}: {rec['n']} answer lengths, mean {rec['mean']}, "
              f"{rec['at_max_new_tokens']} at max_new_tokens={rec['max_new_tokens']}")
        return 0
    source = args.lengths_from or DEFAULT_LENGTHS
    if args.lengths_from is None and not DEFAULT_LENGTHS.is_file():
        print(f"error: no answer lengths: {DEFAULT_LENGTHS} does not exist. Make it from a real "
              "run (ecd-ray generate seeds.limit=32 rounds=3 output_dir=/tmp/simlen "
              "run_name=l, then python benchmarks/simulate_scheduling.py --write-lengths "
              "/tmp/simlen/l) or pass --lengths-from RUN_DIR|FILE.json", file=sys.stderr)
        return 2
    lengths = lengths_from(source)
    meta = {}
    if source.suffix == ".json":
        data = json.loads(source.read_text())
        if isinstance(data, dict):
            meta = {k: v for k, v in data.items() if k != "lengths"}

    cap = args.max_num_seqs
    print(f"{LABEL}\n{args.seeds:,} seeds, rounds={args.rounds}, max_num_seqs={cap}, "
          f"{len(lengths)} answer lengths from {source} (mean {sum(lengths) / len(lengths):.1f}"
          f", max {max(lengths)})", flush=True)
    results: list[SimResult] = []
    for conf in configurations(cap):
        res = simulate(conf["name"], mode=conf["mode"], seeds=args.seeds, lengths=lengths,
                       rounds=args.rounds, max_num_seqs=cap,
                       batch_size=conf.get("batch_size", 16),
                       max_chains=conf.get("max_chains"), seed=args.seed)
        results.append(res)
        print(f"  {res.name}: {res.virtual_steps:,} steps, {res.busy_fraction:.1%} busy "
              f"({res.wall_s:.1f} s)", flush=True)
    base = next(r for r in results if r.mode == "lockstep" and r.batch_size == 16)
    rows = []
    for r in results:
        row = r.row()
        row["speedup_vs_lockstep16"] = round(base.virtual_steps / r.virtual_steps, 2)
        rows.append(row)
    cont, lock64 = results[0], next(r for r in results if r.batch_size == 64)
    horizon = min(args.trace_window, lock64.virtual_steps)
    record = {
        "kind": LABEL,
        "what": "the real ChainScheduler and Chain (template mode) over a simulated engine: "
                "each step advances every running sequence by one token at a cost of one time "
                "unit regardless of how many run, up to max_num_seqs (a GPU decode step); "
                "prefill is free; requests beyond max_num_seqs wait FIFO. No model runs and no "
                "wall-clock time is measured.",
        "command": " ".join(["python", "benchmarks/simulate_scheduling.py", *sys.argv[1:]])
        if argv is None else " ".join(argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "settings": {"seeds": args.seeds, "rounds": args.rounds, "max_num_seqs": cap,
                     "evolution_mode": "template", "length_seed": args.seed},
        "answer_lengths": {"source": str(source), "n": len(lengths),
                           "mean": round(sum(lengths) / len(lengths), 1),
                           "max": max(lengths), **meta},
        "results": rows,
        "trace_window_steps": horizon,
        "traces": {
            cont.name: window(cont.trace, horizon),
            lock64.name: window(lock64.trace, horizon),
        },
        "occupancy_binned": {
            r.name: binned(r.trace, r.virtual_steps, 100) for r in (cont, lock64)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    png = args.out.with_suffix(".png")
    plot(record, {cont.name: "tab:green", lock64.name: "tab:gray"}, png)
    print()
    print(table(rows))
    print(f"\nwrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
