"""Soak: many seeds through ``ecd-ray generate``; is the pipeline's throughput flat, and do its
memory, file descriptors and object store stay bounded? (issue 12)

    .venv/bin/python benchmarks/soak.py                        # 10,000 seeds (minutes)
    .venv/bin/python benchmarks/soak.py --seeds 500 --window 5 --out /tmp/soak.json   # CI's

The pipeline, not the model, is under test: the transformers engine with a tiny random Llama
(2 layers, SmolLM2's tokenizer, as in tests/conftest.py), ``--rounds`` rounds and
``--new-tokens`` new tokens per answer, greedy. The command runs in its own process group with
its own Ray temp dir (``RAY_TMPDIR``); this script samples it every ``--interval`` s from
outside, with psutil, over the command's process and all its descendants (Ray's GCS, raylet
and workers are started by the driver's ``ray.init``):

- seeds done: rows of the finished ``evolutions/*.parquet`` shards (their footers);
- RSS of the driver, and summed over every other process of the tree (Ray and its workers);
- open file descriptors of the driver and summed over the tree;

memory and descriptors are compared between the first and the last quarter of the chain phase
(from the first finished shard to the last; the pairs derivation after it is another phase,
whose peaks are recorded apart);
- bytes of spilled objects on disk (files under the run's Ray temp dir whose path holds
  ``spill``).

Throughput is binned into windows of ``--window`` s (60: seeds per minute). It is counted from
the chain actors' completion tokens, which each actor logs twice a second
(``logs/occupancy-*.jsonl``; every request makes exactly ``--new-tokens`` tokens, so tokens are
proportional to chains), converted to chains with the run's tokens per chain. The count of
finished shards is kept beside it (``windows_by_shards``), but it moves a whole shard at a time:
250 chains, 10-15% of a minute's work here, so one shard more or less in a window is a
swing of that size that is not the pipeline's. The steady windows are the full windows after
the first shard was written (engine start-up) and before the last seed; "flat" means every steady
window's rate is within ``--flat-tolerance`` (10%) of their mean. Each window also records the
cores each group of processes kept busy (chain actors, driver, the rest of Ray, and this
sampling script) and the actors' tokens per CPU-second: they tell a run whose own processes
take CPU from the engine from an engine that gets less done per CPU-second (the machine's
doing: ``engine_drift.py`` measures the engine alone).

Writes ``--out`` (JSON) and the same name with ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_driver_memory import tiny_model  # noqa: E402  (the same tiny model)

GIB = 1024 ** 3


def seeds_file(path: Path, n: int) -> Path:
    """``n`` distinct synthetic instructions (so none is a duplicate reject)."""
    topics = ["rivers", "bridges", "volcanoes", "markets", "orchards", "satellites", "glaciers",
              "lighthouses", "libraries", "deserts", "harbours"]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"instruction": f"Describe {topics[i % len(topics)]} number {i} "
                                                f"in {2 + i % 3} sentences."}) + "\n")
    return path


def generate_args(model: Path, seeds: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return ["generate", f"output_dir={out}", "run_name=soak", f"seeds.path={seeds}",
            f"teacher.model={model}", "teacher.engine=transformers", "teacher.dtype=float32",
            f"rounds={args.rounds}", f"teacher.max_new_tokens={args.new_tokens}",
            f"teacher.min_new_tokens={args.new_tokens}", "teacher.batch_size=64",
            f"teacher.temperature={args.temperature}", "teacher.num_cpus=1", "ray.num_cpus=2",
            "pairs.policy=all", "pairs.truncated_chosen=keep"]


class ShardCounter:
    """Rows of the finished shards of a folder, each footer read once."""

    def __init__(self, folder: Path):
        self.folder, self.rows = folder, {}

    def __call__(self) -> int:
        import pyarrow.parquet as pq

        if self.folder.is_dir():
            for p in self.folder.glob("*.parquet"):
                if p.name not in self.rows:
                    try:
                        self.rows[p.name] = pq.ParquetFile(p).metadata.num_rows
                    except Exception:  # noqa: BLE001, S112 - renamed or removed under us: next time
                        continue
        return sum(self.rows.values())


def _tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _spilled_bytes(ray_tmp: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(ray_tmp):
        if "spill" in dirpath:
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except OSError:
                    pass
    return total


class CpuByGroup:
    """CPU seconds (user + system) used so far by the driver, the chain actors and the rest
    of the tree. Each sample adds every process's CPU since its previous sample to the group
    its title names now, so a Ray worker that becomes a chain actor brings none of its
    earlier CPU along, and a process that exits keeps what it used."""

    def __init__(self, driver: int):
        self.driver = driver
        self.last: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU seen
        self.total = {"driver": 0.0, "actors": 0.0, "others": 0.0}

    def add(self, proc: Any, title: str) -> None:
        times = proc.cpu_times()
        used = times.user + times.system
        key = (proc.pid, proc.create_time())
        group = "driver" if proc.pid == self.driver else \
            "actors" if "ChainActor" in title else "others"
        self.total[group] += used - self.last.get(key, 0.0)
        self.last[key] = used


def sample(pid: int, count: ShardCounter, ray_tmp: Path, t0: float,
           cpu: CpuByGroup) -> dict[str, Any]:
    import psutil

    driver_rss = driver_fds = others_rss = tree_fds = 0
    procs = _tree(pid)
    for p in procs:
        try:
            rss, fds = p.memory_info().rss, p.num_fds()
            cpu.add(p, p.name() if p.pid == pid else " ".join(p.cmdline()[:1]))
        except psutil.Error:
            continue
        tree_fds += fds
        if p.pid == pid:
            driver_rss, driver_fds = rss, fds
        else:
            others_rss += rss
    spilled = _spilled_bytes(ray_tmp)
    return {"t": round(time.monotonic() - t0, 2), "seeds_done": count(),
            "driver_rss": driver_rss, "others_rss": others_rss, "driver_fds": driver_fds,
            "tree_fds": tree_fds, "processes": len(procs), "spilled": spilled,
            # CPU seconds so far (user + system) of the live processes of each group, and of
            # this sampling script itself, which shares the machine's cores with the run
            "cpu_s": {k: round(v, 2) for k, v in cpu.total.items()},
            "sampler_cpu_s": round(time.process_time(), 2)}


def windows(series: list[dict[str, Any]], window: float) -> list[dict[str, Any]]:
    """Seeds finished per window of ``window`` s (as seeds per minute), each marked steady or
    not: steady = wholly after the first finished shard and before the last seed."""
    if not series:
        return []
    first = next((s["t"] for s in series if s["seeds_done"] > 0), None)
    total = series[-1]["seeds_done"]
    last = next((s["t"] for s in series if s["seeds_done"] >= total), series[-1]["t"])

    def done_at(t: float) -> float:  # linear between samples
        prev = series[0]
        for s in series:
            if s["t"] >= t:
                if s["t"] == prev["t"]:
                    return s["seeds_done"]
                frac = (t - prev["t"]) / (s["t"] - prev["t"])
                return prev["seeds_done"] + frac * (s["seeds_done"] - prev["seeds_done"])
            prev = s
        return series[-1]["seeds_done"]

    out, start = [], 0.0
    while start + window <= series[-1]["t"] + 1e-9:
        end = start + window
        seeds = done_at(end) - done_at(start)
        out.append({"start_s": round(start, 1), "end_s": round(end, 1),
                    "seeds_per_min": round(seeds * 60 / window, 1),
                    "steady": first is not None and start >= first and end <= last})
        start = end
    return out


def engine_tokens(logs: Path, t0_unix: float) -> list[tuple[float, int]]:
    """The chain actors' completion tokens so far, summed over actors, as (seconds since the
    command started, tokens): from the ``occupancy-*.jsonl`` files each actor appends twice a
    second. An actor restarted counts from zero again; its earlier tokens are kept."""
    per_actor = []
    for path in sorted(logs.glob("occupancy-*.jsonl")):
        points, base, last = [], 0, 0
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["tokens"] < last:  # a new incarnation
                base += last
            last = row["tokens"]
            points.append((row["t"] - t0_unix, base + last))
        per_actor.append(points)
    times = sorted({t for points in per_actor for t, _ in points})
    return [(round(t, 3), sum(_at(points, t) for points in per_actor)) for t in times]


def _at(points: list[tuple[float, int]], t: float) -> float:
    """Linear interpolation of a cumulative count at ``t`` (0 before, last value after)."""
    prev = (points[0][0], 0) if points else (t, 0)
    for pt, value in points:
        if pt >= t:
            if pt == prev[0]:
                return value
            return prev[1] + (t - prev[0]) / (pt - prev[0]) * (value - prev[1])
        prev = (pt, value)
    return prev[1]


def engine_windows(tokens: list[tuple[float, int]], series: list[dict[str, Any]],
                   window: float, tokens_per_chain: float) -> list[dict[str, Any]]:
    """Chains per minute in each window from the engine's completion tokens (every request
    of the soak makes exactly ``--new-tokens`` tokens, min = max, so tokens are proportional
    to chains), sampled at 2 Hz: unlike the shard count, which moves a whole shard (250
    chains, 10-15% of a minute's work here) at a time. Steady windows as in ``windows``;
    each window also has the CPU the run's processes and this script used (cores busy) and
    the tokens per CPU-second of the chain actors."""
    wins = windows(series, window)
    cpu_t = [(s["t"], s) for s in series if "cpu_s" in s]

    def cpu_at(t: float, key: str) -> float:
        pts = [(ts, s["sampler_cpu_s"] if key == "sampler" else s["cpu_s"][key])
               for ts, s in cpu_t]
        return _at(pts, t)

    out = []
    for w in wins:
        a, b = w["start_s"], w["end_s"]
        made = _at(tokens, b) - _at(tokens, a)
        row = {**w, "seeds_per_min": round(made / tokens_per_chain * 60 / window, 1),
               "tokens_per_s": round(made / window, 1)}
        if cpu_t:
            busy = {k: round((cpu_at(b, k) - cpu_at(a, k)) / window, 3)
                    for k in ("actors", "driver", "others", "sampler")}
            row["cores_busy"] = busy
            row["tokens_per_actor_cpu_s"] = (round(made / (busy["actors"] * window), 1)
                                             if busy["actors"] > 0 else None)
        out.append(row)
    return out


def flatness(wins: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    rates = [w["seeds_per_min"] for w in wins if w["steady"]]
    if len(rates) < 2:
        return {"steady_windows": len(rates), "flat": None,
                "why": "fewer than 2 steady windows: run more seeds or use a shorter --window"}
    mean = statistics.fmean(rates)
    worst = max(abs(r / mean - 1) for r in rates)
    return {"steady_windows": len(rates), "mean_seeds_per_min": round(mean, 1),
            "min": min(rates), "max": max(rates), "worst_deviation": round(worst, 4),
            "tolerance": tolerance, "flat": worst <= tolerance}


def chain_phase(series: list[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """The samples taken while chains were being written: after the first finished shard and
    before the last (start-up, and the pairs derivation that follows, are other phases)."""
    return [s for s in series if 0 < s["seeds_done"] < total]


def growth(series: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Peak of ``key`` over ``series``, and in its first and its last quarter."""
    steady = [s for s in series if s[key] > 0]
    if len(steady) < 8:
        return {"peak": max((s[key] for s in series), default=0)}
    q = len(steady) // 4
    first, last = max(s[key] for s in steady[:q]), max(s[key] for s in steady[-q:])
    return {"peak": max(s[key] for s in series), "first_quarter_peak": first,
            "last_quarter_peak": last, "last_over_first": round(last / first, 4)}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model = tiny_model(work / "tiny")
    seeds = seeds_file(work / "seeds.jsonl", args.seeds)
    out = work / "out"
    ray_tmp = Path(tempfile.mkdtemp(prefix="soakray-", dir="/tmp"))  # short: socket paths
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "ecd_ray.cli", *generate_args(model, seeds, out, args)]
    log = work / "generate.log"
    count = ShardCounter(out / "soak" / "evolutions")
    series: list[dict[str, Any]] = []
    t0, t0_unix = time.monotonic(), time.time()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        cpu = CpuByGroup(proc.pid)
        try:
            while proc.poll() is None:
                series.append(sample(proc.pid, count, ray_tmp, t0, cpu))
                if series[-1]["t"] > args.timeout:
                    raise TimeoutError(f"the soak ran past {args.timeout} s")
                time.sleep(args.interval)
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)  # the group this script started, by its id
            proc.wait()
            raise
    wall = time.monotonic() - t0
    series.append({**series[-1], "t": round(wall, 2), "seeds_done": count()}
                  if series else {"t": round(wall, 2), "seeds_done": count()})
    if proc.returncode != 0:
        raise RuntimeError(f"generate exited {proc.returncode}; see {log}:\n"
                           + log.read_text()[-3000:])
    manifest = json.loads((out / "soak" / "manifest.json").read_text())
    during = chain_phase(series[:-1], args.seeds)
    shard_wins = windows(series, args.window)
    tokens = engine_tokens(out / "soak" / "logs", t0_unix)
    chains = manifest["counts"]["chains"]
    per_chain = tokens[-1][1] / chains if tokens and chains else None
    wins = engine_windows(tokens, series, args.window, per_chain) if per_chain else shard_wins
    return {
        "wall_s": round(wall, 1), "seeds": args.seeds,
        "chains": chains, "accounting_ok": manifest["accounting"]["ok"],
        "pairs": manifest["counts"].get("pairs"),
        "throughput_from": "engine tokens (2 Hz)" if per_chain else "finished shards",
        "tokens_per_chain": round(per_chain, 2) if per_chain else None,
        "windows": wins, "throughput": flatness(wins, args.flat_tolerance),
        "windows_by_shards": shard_wins,
        "throughput_by_shards": flatness(shard_wins, args.flat_tolerance),
        "chain_phase_s": [during[0]["t"], during[-1]["t"]] if during else None,
        "driver_rss": growth(during, "driver_rss"),
        "others_rss": growth(during, "others_rss"),
        "driver_rss_peak_whole_run": max((s["driver_rss"] for s in series[:-1]), default=0),
        "tree_fds_peak_whole_run": max((s["tree_fds"] for s in series[:-1]), default=0),
        "driver_fds": {"first": during[0]["driver_fds"] if during else None,
                       "last": during[-1]["driver_fds"] if during else None,
                       "peak": max((s["driver_fds"] for s in during), default=None)},
        "tree_fds": {"first": during[0]["tree_fds"] if during else None,
                     "last": during[-1]["tree_fds"] if during else None,
                     "peak": max((s["tree_fds"] for s in during), default=None)},
        "spilled_bytes_peak": max((s.get("spilled", 0) for s in series), default=0),
        "series": series[:-1],
    }


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = data["series"]
    t = [s["t"] for s in series]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    wins = data["windows"]
    axes[0].bar([w["start_s"] for w in wins], [w["seeds_per_min"] for w in wins],
                width=[w["end_s"] - w["start_s"] for w in wins], align="edge",
                color=["tab:blue" if w["steady"] else "lightgray" for w in wins])
    axes[0].set_xlabel("time (s)")
    axes[0].set_ylabel("seeds per minute")
    th = data["throughput"]
    axes[0].set_title(f"throughput (steady: blue; worst dev {th.get('worst_deviation')})")
    axes[1].plot(t, [s["driver_rss"] / GIB for s in series], label="driver")
    axes[1].plot(t, [s["others_rss"] / GIB for s in series], label="Ray + workers (sum)")
    axes[1].set_xlabel("time (s)")
    axes[1].set_ylabel("RSS (GiB)")
    axes[1].legend()
    axes[1].set_title("memory")
    axes[2].plot(t, [s["driver_fds"] for s in series], label="driver")
    axes[2].plot(t, [s["tree_fds"] for s in series], label="all processes")
    axes[2].set_xlabel("time (s)")
    axes[2].set_ylabel("open file descriptors")
    axes[2].legend()
    axes[2].set_title("file descriptors")
    fig.suptitle(f"soak: {data['seeds']} seeds, {data['wall_s']} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy. The tiny random model's greedy answers decode to nothing, "
                         "so every chain ends at its first answer; sampling (each request "
                         "seeded) gives answers, and chains of every level")
    ap.add_argument("--interval", type=float, default=1.0, help="sampling period (s)")
    ap.add_argument("--window", type=float, default=60.0, help="throughput window (s)")
    ap.add_argument("--flat-tolerance", type=float, default=0.10)
    ap.add_argument("--timeout", type=float, default=3 * 3600)
    ap.add_argument("--work", type=Path, default=None, help="keep the run here (default: temp)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    args = ap.parse_args(argv)
    from ecd_ray.hardware import cpu_info

    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        data = run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="ecd-soak-") as tmp:
            data = run(args, Path(tmp))
    cpu = cpu_info()
    data.update({
        "what": "ecd-ray generate soak: transformers engine, tiny random Llama, "
                f"{args.rounds} rounds, {args.new_tokens} new tokens, greedy",
        "cpu": {"model": cpu["model"], "cores": os.cpu_count(),
                "flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                          if f in cpu["flags"]]},
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["benchmarks/soak.py", *(argv if argv is not None
                                                      else sys.argv[1:])]),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    plot(data, args.out.with_suffix(".png"))
    for w in data["windows"]:
        if w.get("steady") and "cores_busy" in w:
            print(f"  {w['start_s']:>6.0f}-{w['end_s']:<6.0f} s: {w['seeds_per_min']:>8.1f} "
                  f"seeds/min, {w['tokens_per_s']:>7.1f} tok/s; cores busy {w['cores_busy']}; "
                  f"{w['tokens_per_actor_cpu_s']} tokens per actor CPU-s")
    th = data["throughput"]
    print(f"{data['seeds']} seeds in {data['wall_s']} s; chains {data['chains']}, accounting "
          f"ok={data['accounting_ok']}; steady throughput {th.get('mean_seeds_per_min')} "
          f"seeds/min over {th['steady_windows']} windows, worst deviation "
          f"{th.get('worst_deviation')} (flat={th['flat']}); driver RSS peak "
          f"{data['driver_rss']['peak'] / GIB:.2f} GiB (last/first quarter "
          f"{data['driver_rss'].get('last_over_first')}); driver fds "
          f"{data['driver_fds']['first']} -> {data['driver_fds']['last']}; spilled "
          f"{data['spilled_bytes_peak']} B; wrote {args.out}")
    return data


if __name__ == "__main__":
    main()
