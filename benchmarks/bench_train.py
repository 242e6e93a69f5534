"""TRL's ``DPOTrainer`` and ``ecd-ray train`` side by side, on the same work (issue 11).

    python benchmarks/bench_train.py                       # out/demo/pairs, 48 pairs, 6 steps
    python benchmarks/bench_train.py --ecd-override strategy=ddp num_workers=1 cpus_per_worker=2
    python benchmarks/bench_train.py --pairs P --model M --n-pairs 8 --steps 2 \\
        --max-length 64 --out /tmp/t.json                  # a smoke run (tests/test_bench_train.py)

One command trains, one after the other and each as its own command (a subprocess), in up to
four modes (``--modes``):

- ``trl``: TRL's ``DPOTrainer`` with its default reference, a second model run on the fly;
- ``trl_precompute``: TRL with ``precompute_ref_log_probs=True``;
- ``ecd_precomputed``: ``ecd-ray train reference=precomputed`` (``python -m ecd_ray.cli
  train``, Ray started by the command; the trainer's defaults, i.e. DeepSpeed ZeRO-3 over
  2 workers x 1 CPU, unless ``--ecd-override`` changes them);
- ``ecd_resident``: ``ecd-ray train reference=resident``.

The same work on both sides:

- the model (``--model``, resolved by ``ecd_ray.models.resolve_model``; fp32);
- the pairs: the first ``--n-pairs`` rows of ``--pairs`` (shards in name order), written to
  one Parquet file that every mode reads;
- the tokens: by default (``--tokenisation ecd``) the TRL run tokenises the pairs with
  ``ecd_ray.train.collate.tokenize_pair`` (the chat template on the prompt messages with the
  generation prompt, the response up to its end-of-turn token, the prompt cut to
  ``--max-prompt-tokens`` and the answer to ``--max-length``) and hands TRL ``prompt_ids``,
  ``chosen_ids`` and ``rejected_ids``, so both sides train on identical sequences.
  ``--tokenisation trl`` gives TRL the conversational rows and lets it tokenise (it keeps the
  newline the template renders after ``<|im_end|>`` and truncates whole sequences instead);
- the batches: ``--global-batch`` pairs per optimizer step, ``--micro-batch-size`` pairs per
  forward on both sides (ecd: ``grad_accum = global / (micro x num_workers)``; TRL:
  ``global / micro``). With ``--order ecd`` (the default) the ecd modes run first with
  ``data_log=true`` and TRL trains on the first ecd run's micro-batches, in its order
  (``train_sampling_strategy=sequential``), so each step sees the same pairs on both sides
  and the loss curves are comparable step by step; ``--order file`` lets TRL take the pairs
  in file order instead. How a micro-batch becomes rows is each side's own: TRL pads chosen
  and rejected rows to the longest; ecd uses its default ``layout=auto`` (shared-prompt rows
  for SmolLM2: the prompt once per pair, no answer padded to its partner's length;
  ``--ecd-override layout=padded`` gives it TRL's rows). The tokens counted are the same
  (prompt + chosen plus prompt + rejected of every pair, without padding);
- the optimisation: DPO (sigmoid) with ``--beta``, AdamW at ``--lr`` with a cosine schedule,
  no warm-up, ``--weight-decay`` and ``--clip-grad``, ``--steps`` optimizer steps;
  gradient checkpointing ``--gradient-checkpointing`` on both (default off: ecd's choice on
  CPU; TRL's own default is on); TRL's other defaults stay (its fused AdamW, its chunked
  log-probs); ``--trl-arg key=value`` and ``--ecd-override key=value`` change either side;
- saving: ecd writes a resumable checkpoint at the last step and exports the model; TRL
  does the same with ``--trl-save checkpoint`` (the default: ``save_steps`` = the last step,
  then ``save_model``).

Measured per mode:

- training tokens/s: tokens are the non-pad tokens of prompt+chosen plus prompt+rejected of
  every micro-batch trained on (ecd: its per-step ``tokens``; TRL: the collated batches'
  ``attention_mask`` summed in ``training_step``), divided by the step times, the first step
  left out when there are several (it holds warm-up costs: ecd's summary does the same);
- mean step time (the same steps), and the whole command's wall time, from spawning the
  command to its exit: interpreter and imports, Ray start, reference stage, data set-up,
  training, checkpoint and export all included; the reference stage's own time (ecd: its
  ``pairs_ref/_SUCCESS``; TRL: ``_precompute_ref_logps``);
- peak RSS, sampled every ``--interval`` s (0.5) by this process (which is outside what it
  measures) with psutil: see :class:`ProcessTreeSampler`. Each sample finds the command's
  processes two ways and takes their union: (1) the command's process and all its
  descendants (``children(recursive=True)``), and (2) every process whose environment holds
  ``ECD_BENCH_TAG=<a fresh id per command>``, which the command inherits and every process
  it starts inherits in turn, Ray's included (the GCS, the raylet and the workers the
  raylet starts get the driver's environment), even when a process has been re-parented to
  init. A second Ray session on the machine (another run) has no tag and is not counted.
  Recorded: the peak over samples of the summed RSS of all those processes (``tree``), the
  same for RSS minus shared pages (``anon``: statm's resident - shared, which counts each
  process's private memory once; the summed RSS counts the shared libraries and Ray's shared
  object store once per process that maps them), and the peak RSS of the training
  process(es): TRL's process; for ecd every process whose title holds ``RayTrainWorker``
  (the per-worker peak, and the peak of their sum);
- the loss per step (and lr, rewards) of every mode, and how far the curves agree on the
  steps where both sides trained on the same pairs.

Writes ``--out`` (JSON) and the same name with ``.png``, prints a table. The goal ratios
(issue 11) are computed against TRL's default mode: ecd tok/s / TRL tok/s (>= 1.5), ecd wall
/ TRL wall (<= 0.8), training process RSS ratio (<= 0.6), whole-tree RSS ratio (<= 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODES = ("trl", "trl_precompute", "ecd_precomputed", "ecd_resident")
LABELS = {"trl": "TRL, reference on the fly (default)",
          "trl_precompute": "TRL, precompute_ref_log_probs",
          "ecd_precomputed": "ecd-ray train, reference=precomputed",
          "ecd_resident": "ecd-ray train, reference=resident"}
BASELINE = "trl"  # the goal ratios are against TRL's default mode
TAG_ENV = "ECD_BENCH_TAG"
GIB = 2**30
# Settings the harness sets on both sides; --ecd-override may not change them (use the flag).
PROTECTED = {"pairs": "--pairs/--n-pairs", "max_pairs": "--n-pairs", "model": "--model",
             "max_steps": "--steps", "epochs": "--steps", "micro_batch_size":
             "--micro-batch-size", "grad_accum": "--global-batch", "lr": "--lr",
             "beta": "--beta", "loss": "(DPO only)", "schedule": "(cosine only)",
             "warmup_steps": "(no warm-up)", "weight_decay": "--weight-decay",
             "clip_grad": "--clip-grad", "optimizer": "(AdamW only)",
             "max_length": "--max-length", "max_prompt_tokens": "--max-prompt-tokens",
             "reference": "--modes", "output_dir": "--work", "run_name": "--modes",
             "data_log": "(needed for --order ecd)", "gradient_checkpointing":
             "--gradient-checkpointing", "dtype": "(fp32 on both sides)", "seed": "--seed"}


# ---------------------------------------------------------------------------------------------
# Memory of a command and every process it starts


class ProcessTreeSampler:
    """Samples, every ``interval`` s on a thread, the RSS of a command's processes: ``root``
    and its descendants, plus every process whose environment has ``TAG_ENV=tag`` (see the
    module docstring). ``is_training(title)`` marks the training processes by their title
    (``cmdline[0]``, which Ray sets to ``ray::<Actor>``); ``root_is_training`` marks ``root``.
    """

    def __init__(self, root: int, tag: str | None, *, interval: float = 0.5,
                 is_training: Callable[[str], bool] | None = None,
                 root_is_training: bool = False):
        self.root, self.tag, self.interval = root, tag, interval
        self.is_training = is_training or (lambda _title: False)
        self.root_is_training = root_is_training
        self._tagged: dict[tuple[int, float], bool] = {}  # (pid, create_time) -> has the tag
        self._procs: dict[int, dict[str, Any]] = {}
        self.samples = 0
        self.peak = {"tree_rss": 0, "tree_anon": 0, "training_sum_rss": 0}
        self.peak_at: float | None = None
        self.series: list[tuple[float, float, float]] = []  # (s, tree GiB, training GiB)
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _has_tag(self, proc: Any) -> bool:
        import psutil

        try:
            key = (proc.pid, proc.create_time())
        except (psutil.Error, OSError):
            return False
        if key not in self._tagged:
            try:
                self._tagged[key] = proc.environ().get(TAG_ENV) == self.tag
            except (psutil.Error, OSError):
                self._tagged[key] = False
        return self._tagged[key]

    def members(self) -> dict[int, tuple[Any, str]]:
        """The command's live processes now: ``{pid: (process, "tree" | "tag")}``."""
        import psutil

        found: dict[int, tuple[Any, str]] = {}
        try:
            if self.root <= 0:
                raise psutil.NoSuchProcess(self.root)
            root = psutil.Process(self.root)
            found[root.pid] = (root, "tree")
            for child in root.children(recursive=True):
                found[child.pid] = (child, "tree")
        except psutil.Error:
            pass
        if self.tag is not None:
            for proc in psutil.process_iter():
                if proc.pid not in found and self._has_tag(proc):
                    found[proc.pid] = (proc, "tag")
        return found

    def sample(self) -> float:
        """One sample; returns the summed RSS in GiB."""
        import psutil

        total = anon = training = 0
        for pid, (proc, via) in self.members().items():
            try:
                mem = proc.memory_info()
                title = (proc.cmdline() or [proc.name()])[0]
            except (psutil.Error, OSError):
                continue
            rec = self._procs.setdefault(pid, {"pid": pid, "title": title, "via": via,
                                               "peak_rss": 0, "peak_anon": 0,
                                               "training": False})
            rec["title"] = title if title.startswith("ray::") or not rec["title"] else \
                rec["title"]
            rec["training"] |= (pid == self.root and self.root_is_training) or \
                self.is_training(title)
            rec["peak_rss"] = max(rec["peak_rss"], mem.rss)
            rec["peak_anon"] = max(rec["peak_anon"], mem.rss - mem.shared)
            total += mem.rss
            anon += mem.rss - mem.shared
            training += mem.rss if rec["training"] else 0
        self.samples += 1
        if total > self.peak["tree_rss"]:
            self.peak_at = time.monotonic() - self._t0
        self.peak["tree_rss"] = max(self.peak["tree_rss"], total)
        self.peak["tree_anon"] = max(self.peak["tree_anon"], anon)
        self.peak["training_sum_rss"] = max(self.peak["training_sum_rss"], training)
        self.series.append((round(time.monotonic() - self._t0, 2), round(total / GIB, 4),
                            round(training / GIB, 4)))
        return total / GIB

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> ProcessTreeSampler:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.result()

    def result(self) -> dict[str, Any]:
        procs = sorted(self._procs.values(), key=lambda r: -r["peak_rss"])
        training = [r for r in procs if r["training"]]
        return {
            "samples": self.samples, "interval_s": self.interval,
            "peak_tree_rss_gib": self.peak["tree_rss"] / GIB,
            "peak_tree_anon_gib": self.peak["tree_anon"] / GIB,
            "peak_tree_at_s": self.peak_at,
            "peak_training_process_rss_gib": max((r["peak_rss"] for r in training),
                                                 default=0) / GIB,
            "peak_training_sum_rss_gib": self.peak["training_sum_rss"] / GIB,
            "training_processes": len(training),
            "processes_seen": len(procs),
            "found_by_tag_only": sum(r["via"] == "tag" for r in procs),
            "top_processes": [{"pid": r["pid"], "title": r["title"][:80], "via": r["via"],
                               "training": r["training"],
                               "peak_rss_gib": round(r["peak_rss"] / GIB, 4),
                               "peak_anon_gib": round(r["peak_anon"] / GIB, 4)}
                              for r in procs[:12]],
            "series": self.series,
        }


def run_measured(cmd: Sequence[str], env: Mapping[str, str], log: Path, *, interval: float,
                 timeout: float, is_training: Callable[[str], bool] | None = None,
                 root_is_training: bool = False) -> dict[str, Any]:
    """Run ``cmd`` (stdout and stderr to ``log``) under a fresh ``TAG_ENV``; its wall time,
    exit status and :class:`ProcessTreeSampler` result."""
    tag = uuid.uuid4().hex
    env = {**env, TAG_ENV: tag}
    with log.open("w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT)
        sampler = ProcessTreeSampler(proc.pid, tag, interval=interval, is_training=is_training,
                                     root_is_training=root_is_training).start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end(proc.pid)
            rc = proc.wait()
        wall = time.perf_counter() - started
    rss = sampler.stop()
    deadline = time.monotonic() + 15  # Ray's processes may take a moment to go after it
    while (survivors := list(ProcessTreeSampler(0, tag).members())) and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    return {"command": list(cmd), "returncode": rc, "wall_s": wall, "rss": rss,
            "left_running": survivors, "log": str(log)}


def _end(pid: int) -> None:
    """Terminate a command that ran past its time, and the processes it started (by pid)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return
    for p in family:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


# ---------------------------------------------------------------------------------------------
# Pure helpers


def trained_tokens(pairs: Iterable[Any]) -> int:
    """Non-pad tokens of prompt+chosen plus prompt+rejected over ``TokenizedPair``s: what one
    collated batch of them holds in ``attention_mask``."""
    return sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def step_stats(steps: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Tokens/s and mean step time over ``steps`` (each with ``tokens`` and ``step_time_s``),
    without the first step when there are several (warm-up); totals over all steps."""
    if not steps:
        return {"tokens_per_s": math.nan, "mean_step_time_s": math.nan, "tokens": 0,
                "steps_time_s": 0.0, "timed_steps": 0}
    steady = list(steps[1:]) if len(steps) > 1 else list(steps)
    seconds = sum(s["step_time_s"] for s in steady)
    return {"tokens_per_s": sum(s["tokens"] for s in steady) / seconds if seconds else math.nan,
            "mean_step_time_s": seconds / len(steady),
            "tokens": int(sum(s["tokens"] for s in steps)),
            "steps_time_s": sum(s["step_time_s"] for s in steps),
            "timed_steps": len(steady)}


def micro_batches_by_step(records: Iterable[Mapping[str, Any]]) -> dict[int, list[list[str]]]:
    """ecd's ``data_log`` lines (with ``rank`` added) as ``{step: [micro-batch pair ids]}``, the
    micro-batches of a step in (micro index, rank) order: the order a single process that
    accumulates over all of them would take them. A re-run micro-batch (after a restart)
    keeps its last record."""
    latest: dict[tuple[int, int, int], list[str]] = {}
    for r in records:
        latest[(int(r["step"]), int(r["micro"]), int(r["rank"]))] = list(r["pair_ids"])
    out: dict[int, list[list[str]]] = {}
    for step, _micro, _rank in sorted(latest):
        out.setdefault(step, []).append(latest[(step, _micro, _rank)])
    return out


def trl_order(by_step: Mapping[int, list[list[str]]], steps: int, micro_batch_size: int
              ) -> tuple[list[str], bool]:
    """The pair ids TRL reads in sequence (sequential sampler, ``micro_batch_size`` per
    forward) to see ecd's micro-batches of steps ``1..steps``; and whether every micro-batch
    had exactly ``micro_batch_size`` pairs (else TRL's micro-batches differ from ecd's, though
    each step's pairs are the same)."""
    order: list[str] = []
    exact = True
    for step in range(1, steps + 1):
        if step not in by_step:
            raise ValueError(f"the ecd data log has no micro-batches for step {step}")
        for mb in by_step[step]:
            exact &= len(mb) == micro_batch_size
            order += mb
    return order, exact


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def goal_ratios(runs: Mapping[str, Mapping[str, Any]], baseline: str = BASELINE
                ) -> dict[str, dict[str, Any]]:
    """Each ecd mode against ``baseline`` (a TRL mode): the issue-11 goals and whether each
    is met. A run that failed or is missing gives None."""
    base = runs.get(baseline)
    out: dict[str, dict[str, Any]] = {}
    if not base or not base.get("ok"):
        return out
    goals = {  # name: (ecd value, TRL value, ">=" or "<=", target)
        "tokens_per_s": ("tokens_per_s", ">=", 1.5),
        "wall": ("wall_s", "<=", 0.8),
        "training_process_rss": ("peak_training_process_rss_gib", "<=", 0.6),
        "tree_rss": ("peak_tree_rss_gib", "<=", 1.0),
    }
    for mode, run in runs.items():
        if not mode.startswith("ecd") or not run.get("ok"):
            continue
        res = {}
        for name, (key, op, target) in goals.items():
            r = ratio(_value(run, key), _value(base, key))
            met = None if r is None else (r >= target if op == ">=" else r <= target)
            res[name] = {"ratio": r, "goal": f"{op} {target}", "met": met}
        out[mode] = res
    return out


def _value(run: Mapping[str, Any], key: str) -> float | None:
    if key in run:
        return run[key]
    return run.get("rss", {}).get(key)


def comparable_steps(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]
                     ) -> list[int]:
    """The steps ``k`` (from 1, in a row) whose loss two runs should share: both trained on
    the same pairs (as multisets) at every step up to ``k`` with the same learning rate at
    every step before ``k`` (step k's loss comes before its update)."""
    out: list[int] = []
    b_steps = {s["step"]: s for s in b}
    for s in a:
        o = b_steps.get(s["step"])
        if o is None or s.get("pair_ids") is None or o.get("pair_ids") is None or \
                sorted(s["pair_ids"]) != sorted(o["pair_ids"]):
            break
        out.append(s["step"])
        if s.get("lr") is None or o.get("lr") is None or \
                not math.isclose(s["lr"], o["lr"], rel_tol=1e-6, abs_tol=1e-12):
            break  # the next step's loss follows a different update
    return out


def loss_agreement(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each (TRL mode, ecd mode): :func:`comparable_steps`, the largest |loss
    difference| on them, the first step whose learning rates differ, and the largest
    |loss difference| over all steps (which also holds order and schedule differences)."""
    out: dict[str, dict[str, Any]] = {}
    for t_mode, t in runs.items():
        for e_mode, e in runs.items():
            if not (t_mode.startswith("trl") and e_mode.startswith("ecd")) or \
                    not (t.get("ok") and e.get("ok")):
                continue
            steps = comparable_steps(e["steps"], t["steps"])
            e_loss = {s["step"]: s["loss"] for s in e["steps"]}
            t_loss = {s["step"]: s["loss"] for s in t["steps"]}
            t_lr = {s["step"]: s.get("lr") for s in t["steps"]}
            lr_differs = next((s["step"] for s in e["steps"] if s.get("lr") is not None and
                               t_lr.get(s["step"]) is not None and not math.isclose(
                                   s["lr"], t_lr[s["step"]], rel_tol=1e-6, abs_tol=1e-12)),
                              None)
            every = [abs(e_loss[k] - t_loss[k]) for k in e_loss if k in t_loss]
            out[f"{t_mode} vs {e_mode}"] = {
                "comparable_steps": steps,
                "max_abs_loss_diff": max((abs(e_loss[k] - t_loss[k]) for k in steps),
                                         default=None),
                "lr_differs_from_step": lr_differs,
                "max_abs_loss_diff_all_steps": max(every, default=None)}
    return out


# ---------------------------------------------------------------------------------------------
# Data


def write_subset(src: Path, n: int, dest: Path) -> list[str]:
    """The first ``n`` pairs of ``src`` (a Parquet file or a folder of shards, read in name
    order) into ``dest/pairs.parquet``; returns their pair ids (which must be unique)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [src] if src.is_file() else sorted(src.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {src}")
    tables, rows = [], 0
    for f in files:
        t = pq.read_table(f)
        tables.append(t.slice(0, n - rows))
        rows += tables[-1].num_rows
        if rows >= n:
            break
    if rows < n:
        raise ValueError(f"{src} holds {rows} pairs, fewer than --n-pairs {n}")
    table = pa.concat_tables(tables, promote_options="default")
    ids = table.column("pair_id").to_pylist()
    if None in ids or len(set(ids)) != len(ids):
        raise ValueError(f"the first {n} pairs of {src} need unique, non-null pair_id values")
    dest.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dest / "pairs.parquet")
    return ids


# ---------------------------------------------------------------------------------------------
# TRL: the command a TRL user would run (this file with `trl-worker SPEC`)


def trl_worker(spec_path: Path) -> int:
    """Train with TRL's DPOTrainer as ``spec`` says; writes ``spec["result"]`` (JSON)."""
    import resource

    t_start = time.perf_counter()
    spec = json.loads(spec_path.read_text())
    import pyarrow.parquet as pq
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    timings: dict[str, float] = {"imports_s": time.perf_counter() - t_start}
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    by_id = {r["pair_id"]: r for r in pq.read_table(spec["pairs"]).to_pylist()}
    rows = [by_id[i] for i in spec["order"]]
    if spec["tokenisation"] == "ecd":
        from ecd_ray.train.collate import CollateConfig, tokenize_table_rows

        pairs = tokenize_table_rows(tokenizer, rows, CollateConfig(
            max_prompt_tokens=spec["max_prompt_tokens"], max_length=spec["max_length"],
            truncation="keep_end"))
        data = Dataset.from_dict({
            "prompt_ids": [p.chosen_ids[:p.prompt_len] for p in pairs],
            "chosen_ids": [p.chosen_ids[p.prompt_len:] for p in pairs],
            "rejected_ids": [p.rejected_ids[p.prompt_len:] for p in pairs]})
    else:
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                  for r in rows])
    timings["data_s"] = time.perf_counter() - t

    class BenchDPOTrainer(DPOTrainer):
        """DPOTrainer that counts the tokens of every batch it trains on, keeps each
        micro-batch's loss unrounded, and times the reference precompute."""

        def __init__(self, *a: Any, **kw: Any):
            self.bench_tokens, self.bench_losses, self.bench_reference_s = 0, [], 0.0
            super().__init__(*a, **kw)

        def _prepare_dataset(self, dataset: Any, *a: Any, **kw: Any) -> Any:
            if "prompt_ids" in dataset.column_names:  # tokenised by ecd_ray's collation
                return dataset
            return super()._prepare_dataset(dataset, *a, **kw)

        def _precompute_ref_logps(self, *a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **kw)
            finally:
                self.bench_reference_s += time.perf_counter() - t0

        def training_step(self, *a: Any, **kw: Any) -> Any:
            inputs = a[1] if len(a) > 1 else kw["inputs"]
            self.bench_tokens += int(inputs["attention_mask"].sum())
            return super().training_step(*a, **kw)

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                self.bench_losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    g = spec["micro_batch_size"]
    steps_pairs = spec["global_batch"]

    class Steps(TrainerCallback):
        def __init__(self) -> None:
            self.records: list[dict[str, Any]] = []
            self.logs: dict[int, dict[str, float]] = {}
            self.last = time.perf_counter()
            self.lr = math.nan
            self.trainer: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.last = time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sched = kw.get("lr_scheduler")
            self.lr = float(sched.get_last_lr()[0]) if sched is not None else math.nan

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now, tr = time.perf_counter(), self.trainer
            step = int(state.global_step)
            self.records.append({
                "step": step, "loss": sum(tr.bench_losses) / max(len(tr.bench_losses), 1),
                "micro_losses": list(tr.bench_losses), "tokens": tr.bench_tokens,
                "step_time_s": now - self.last, "lr": self.lr,
                "pair_ids": spec["order"][(step - 1) * steps_pairs: step * steps_pairs]})
            tr.bench_tokens, tr.bench_losses = 0, []
            self.last = now

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kw: Any) -> None:
            if logs and "loss" in logs:
                self.logs[int(state.global_step)] = {k: v for k, v in logs.items()
                                                     if isinstance(v, int | float)}

    save = spec["save"]
    config = {
        "output_dir": spec["out_dir"], "per_device_train_batch_size": g,
        "gradient_accumulation_steps": spec["global_batch"] // g, "max_steps": spec["steps"],
        "learning_rate": spec["lr"], "lr_scheduler_type": "cosine", "warmup_steps": 0,
        "weight_decay": spec["weight_decay"],
        "max_grad_norm": spec["clip_grad"] if spec["clip_grad"] is not None else 0.0,
        "beta": spec["beta"], "loss_type": ["sigmoid"], "max_length": spec["max_length"],
        "bf16": False, "fp16": False, "use_cpu": True,
        "model_init_kwargs": {"dtype": "float32"},
        "gradient_checkpointing": spec["gradient_checkpointing"],
        "precompute_ref_log_probs": spec["precompute"],
        "logging_steps": 1, "report_to": "none", "seed": spec["seed"],
        "train_sampling_strategy": "sequential", "dataloader_num_workers": 0,
        "save_strategy": "steps" if save == "checkpoint" else "no",
        "save_steps": spec["steps"], "save_only_model": False,
        **spec["trl_args"]}
    t = time.perf_counter()
    args = DPOConfig(**config)
    steps_cb = Steps()
    trainer = BenchDPOTrainer(model=spec["model"], args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[steps_cb])
    steps_cb.trainer = trainer
    timings["trainer_init_s"] = time.perf_counter() - t  # precompute included
    t = time.perf_counter()
    trainer.train()
    timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if save in ("checkpoint", "model"):
        trainer.save_model(str(Path(spec["out_dir"]) / "model"))
    timings["save_s"] = time.perf_counter() - t
    for rec in steps_cb.records:
        log = steps_cb.logs.get(rec["step"], {})
        rec.update({"rewards/chosen": log.get("rewards/chosen"),
                    "rewards/rejected": log.get("rewards/rejected"),
                    "rewards/margin": log.get("rewards/margins"),
                    "rewards/accuracy": log.get("rewards/accuracies"),
                    "trl_logged_loss": log.get("loss")})
    param = next(trainer.model.parameters())
    result = {
        "steps": steps_cb.records, "timings": timings,
        "reference_s": trainer.bench_reference_s,
        "self_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch_threads": torch.get_num_threads(), "param_dtype": str(param.dtype),
        "optimizer": type(trainer.optimizer).__name__, "optim": str(args.optim),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "trl_config": {k: config[k] for k in sorted(config) if k != "output_dir"},
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2, default=str))
    return 0


def run_trl(mode: str, args: argparse.Namespace, ctx: dict[str, Any], order: list[str],
            env: dict[str, str]) -> dict[str, Any]:
    out_dir = ctx["work"] / mode
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    spec = {
        "model": str(ctx["model_dir"]), "pairs": str(ctx["pairs_file"]), "order": order,
        "tokenisation": args.tokenisation, "max_length": args.max_length,
        "max_prompt_tokens": ctx["max_prompt_tokens"], "micro_batch_size": args.micro_batch_size,
        "global_batch": args.global_batch, "steps": args.steps, "lr": args.lr,
        "beta": args.beta, "weight_decay": args.weight_decay, "clip_grad": args.clip_grad,
        "gradient_checkpointing": args.gradient_checkpointing == "on", "seed": args.seed,
        "precompute": mode == "trl_precompute", "save": args.trl_save,
        "out_dir": str(out_dir / "trainer"), "result": str(out_dir / "result.json"),
        "trl_args": ctx["trl_args"]}
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    env = {**env, "HF_DATASETS_CACHE": str(out_dir / "hf_datasets")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "trl-worker", str(out_dir / "spec.json")]
    run = run_measured(cmd, env, out_dir / "log.txt", interval=args.interval,
                       timeout=args.timeout, root_is_training=True)
    res_path = out_dir / "result.json"
    run |= {"side": "trl", "mode": mode, "ok": run["returncode"] == 0 and res_path.exists()}
    if not run["ok"]:
        run["log_tail"] = _tail(out_dir / "log.txt")
        return run
    res = json.loads(res_path.read_text())
    run |= {k: res[k] for k in ("steps", "timings", "reference_s", "self_peak_rss_gib",
                                "torch_threads", "param_dtype", "optimizer", "optim",
                                "gradient_checkpointing", "versions", "trl_config")}
    return run


# ---------------------------------------------------------------------------------------------
# ecd-ray train


def ecd_overrides(args: argparse.Namespace, ctx: dict[str, Any], num_workers: int) -> list[str]:
    """The train overrides shared by both ecd modes (reference and run_name come per mode)."""
    per_step = args.micro_batch_size * num_workers
    if args.global_batch % per_step:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of "
                         f"--micro-batch-size x num_workers = {per_step}")
    grad_accum = args.global_batch // per_step
    steps_per_epoch = (args.n_pairs // num_workers) // (args.micro_batch_size * grad_accum)
    if steps_per_epoch == 0:
        raise SystemExit(f"--n-pairs {args.n_pairs} is too few for one step of "
                         f"{args.global_batch} pairs over {num_workers} worker(s)")
    epochs = math.ceil(args.steps / steps_per_epoch)
    clip = "null" if args.clip_grad is None else args.clip_grad
    return [
        f"pairs={ctx['pairs_file'].parent}", f"model={ctx['model_dir']}",
        f"output_dir={ctx['work'] / 'ecd'}", "overwrite=true", "data_log=true", "loss=dpo",
        f"beta={args.beta}", "optimizer=adamw", f"lr={args.lr}",
        f"weight_decay={args.weight_decay}", "schedule=cosine", "warmup_steps=0",
        f"clip_grad={clip}", f"micro_batch_size={args.micro_batch_size}",
        f"grad_accum={grad_accum}", f"max_steps={args.steps}", f"epochs={epochs}",
        f"max_length={args.max_length}", f"max_prompt_tokens={ctx['max_prompt_tokens']}",
        "truncation=keep_end", "dtype=float32",
        f"gradient_checkpointing='{args.gradient_checkpointing}'", f"seed={args.seed}",
    ]


def check_ecd_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in PROTECTED:
            raise SystemExit(f"--ecd-override {item}: '{key}' is set on both sides by the "
                             f"benchmark; use {PROTECTED[key]}")


def ecd_num_workers(overrides: Sequence[str]) -> int:
    from ecd_ray.config import load_train_config

    return load_train_config(None, list(overrides)).num_workers


def run_ecd(mode: str, args: argparse.Namespace, ctx: dict[str, Any], env: dict[str, str]
            ) -> dict[str, Any]:
    reference = mode.removeprefix("ecd_")
    run_dir = ctx["work"] / "ecd" / mode
    overrides = [*ctx["ecd_overrides"], f"reference={reference}", f"run_name={mode}",
                 *args.ecd_override]
    cmd = [sys.executable, "-m", "ecd_ray.cli", "train", *overrides]
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    log = ctx["work"] / f"{mode}.log"
    run = run_measured(cmd, env, log, interval=args.interval, timeout=args.timeout,
                       is_training=lambda title: "RayTrainWorker" in title)
    metrics = run_dir / "metrics.jsonl"
    run |= {"side": "ecd", "mode": mode, "overrides": overrides,
            "ok": run["returncode"] == 0 and metrics.exists()}
    if not run["ok"]:
        run["log_tail"] = _tail(log)
        return run
    by_step: dict[int, dict[str, Any]] = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        by_step[int(rec["step"])] = rec
    log_records = []
    for f in sorted((run_dir / "data_log").glob("rank*.jsonl")):
        rank = int(f.stem.removeprefix("rank"))
        log_records += [{**json.loads(x), "rank": rank} for x in f.read_text().splitlines()]
    micro = micro_batches_by_step(log_records)
    run["micro_batches"] = {str(k): v for k, v in micro.items()}
    run["steps"] = [{
        "step": s, "loss": r["loss"], "tokens": int(r["tokens"]),
        "step_time_s": r["step_time_s"], "lr": r.get("lr"),
        "rewards/chosen": r.get("rewards/chosen"), "rewards/rejected": r.get("rewards/rejected"),
        "rewards/margin": r.get("rewards/margin"), "rewards/accuracy": r.get("rewards/accuracy"),
        "worker_peak_rss_gib": r.get("peak_rss_gib"),
        "pair_ids": [i for mb in micro.get(s, []) for i in mb] or None,
    } for s, r in sorted(by_step.items())]
    marker = run_dir / "pairs_ref" / "_SUCCESS"
    run["reference_s"] = json.loads(marker.read_text()).get("seconds", 0.0) \
        if reference == "precomputed" and marker.exists() else 0.0
    summary = run_dir / "train_summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        run["summary"] = {k: s.get(k) for k in ("steps", "planned_steps", "elapsed_s",
                                                "mean_tokens_per_s", "mean_step_time_s",
                                                "peak_rss_gib_per_worker")}
        run["self_peak_rss_gib"] = s.get("peak_rss_gib_per_worker")
        run["config"] = s.get("config")
    return run


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Report


def finish_run(run: dict[str, Any]) -> dict[str, Any]:
    """Adds the derived figures to one run."""
    if not run.get("ok"):
        return run
    stats = step_stats(run["steps"])
    run |= stats
    run["losses"] = [s["loss"] for s in run["steps"]]
    run["other_s"] = run["wall_s"] - stats["steps_time_s"] - (run.get("reference_s") or 0.0)
    run["peak_training_process_rss_gib"] = run["rss"]["peak_training_process_rss_gib"]
    run["peak_tree_rss_gib"] = run["rss"]["peak_tree_rss_gib"]
    return run


def versions() -> dict[str, str]:
    import importlib.metadata

    from ecd_ray.pipeline.manifest import versions as ecd_versions

    out = ecd_versions()
    for name in ("trl", "accelerate", "datasets", "psutil"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(record: dict[str, Any]) -> str:
    lines = [f"{'mode':<16} {'tok/s':>7} {'step s':>7} {'wall s':>7} {'ref s':>6} "
             f"{'train GiB':>9} {'tree GiB':>8} {'loss 1':>7} {'loss N':>7}"]
    for mode, r in record["runs"].items():
        if not r.get("ok"):
            lines.append(f"{mode:<16} FAILED (exit {r.get('returncode')}), see {r.get('log')}")
            continue
        lines.append(
            f"{mode:<16} {_fmt(r['tokens_per_s'], '7.1f')} {_fmt(r['mean_step_time_s'], '7.2f')} "
            f"{_fmt(r['wall_s'], '7.1f')} {_fmt(r.get('reference_s'), '6.1f')} "
            f"{_fmt(r['peak_training_process_rss_gib'], '9.2f')} "
            f"{_fmt(r['peak_tree_rss_gib'], '8.2f')} {_fmt(r['losses'][0], '7.4f')} "
            f"{_fmt(r['losses'][-1], '7.4f')}")
    for mode, goals in record["goals"].items():
        parts = [f"{name} {_fmt(g['ratio'], '.2f')} ({g['goal']}: "
                 f"{'met' if g['met'] else 'missed' if g['met'] is not None else '-'})"
                 for name, g in goals.items()]
        lines.append(f"{mode} / {BASELINE}: " + ", ".join(parts))
    for pair, agree in record["loss_agreement"].items():
        lines.append(f"loss {pair}: comparable steps {agree['comparable_steps']}, max |diff| "
                     f"{_fmt(agree['max_abs_loss_diff'], '.2e')} (all steps "
                     f"{_fmt(agree['max_abs_loss_diff_all_steps'], '.2e')}; lr differs from "
                     f"step {agree['lr_differs_from_step']})")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {m: r for m, r in record["runs"].items() if r.get("ok")}
    colors = {"trl": "#1f77b4", "trl_precompute": "#7fb3e0", "ecd_precomputed": "#d62728",
              "ecd_resident": "#f4a3a3"}
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ax = axes[0][0]
    for mode, r in runs.items():
        ax.plot([s["step"] for s in r["steps"]], r["losses"], "o-", label=mode,
                color=colors.get(mode), alpha=0.8)
    ax.axhline(math.log(2), color="grey", lw=0.8, ls=":")
    ax.set(title="DPO loss per optimizer step", xlabel="step", ylabel="loss")
    ax.legend(fontsize=8)
    names = list(runs)
    xs = range(len(names))
    bar_colors = [colors.get(m) for m in names]

    def bars(ax: Any, values: list[float], title: str, unit: str) -> None:
        ax.bar(xs, values, color=bar_colors)
        ax.set_xticks(list(xs), names, rotation=20, fontsize=8)
        ax.set(title=title, ylabel=unit)
        for x, v in zip(xs, values, strict=True):
            ax.annotate(_fmt(v, ".3g"), (x, v), ha="center", va="bottom", fontsize=8)

    bars(axes[0][1], [runs[m]["tokens_per_s"] for m in names], "training tokens/s (steps 2..N)",
         "tokens/s")
    ax = axes[0][2]
    ref = [runs[m].get("reference_s") or 0.0 for m in names]
    steps = [runs[m]["steps_time_s"] for m in names]
    other = [max(runs[m]["other_s"], 0.0) for m in names]
    ax.bar(xs, ref, color="#9467bd", label="reference stage")
    ax.bar(xs, steps, bottom=ref, color="#2ca02c", label="training steps")
    ax.bar(xs, other, bottom=[a + b for a, b in zip(ref, steps, strict=True)], color="#bbbbbb",
           label="start-up, data, save, rest")
    ax.set_xticks(list(xs), names, rotation=20, fontsize=8)
    ax.set(title="whole command wall time", ylabel="s")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [runs[m]["peak_training_process_rss_gib"] for m in names],
           width, label="per training process (peak)", color="#ff7f0e")
    ax.bar([x + width / 2 for x in xs], [runs[m]["peak_tree_rss_gib"] for m in names], width,
           label="whole process tree (peak of sum)", color="#8c564b")
    ax.set_xticks(list(xs), names, rotation=20, fontsize=8)
    ax.set(title="peak RSS", ylabel="GiB")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    for mode, r in runs.items():
        series = r["rss"]["series"]
        ax.plot([p[0] for p in series], [p[1] for p in series], label=mode,
                color=colors.get(mode))
    ax.set(title="RSS of the whole process tree over time", xlabel="s", ylabel="GiB")
    ax.legend(fontsize=8)
    ax = axes[1][2]
    for mode, r in runs.items():
        ax.plot([s["step"] for s in r["steps"]], [s.get("lr") for s in r["steps"]], "o-",
                label=mode, color=colors.get(mode), alpha=0.8)
    ax.set(title="learning rate per step", xlabel="step", ylabel="lr")
    ax.legend(fontsize=8)
    s = record["settings"]
    fig.suptitle(f"TRL DPOTrainer vs ecd-ray train: {Path(s['model_dir']).name}, "
                 f"{s['n_pairs']} pairs, {s['steps']} steps x {s['global_batch']} pairs, "
                 f"max_length {s['max_length']}, fp32 - {record['cpu']['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ecd_ray.config import EMBEDDED_MODEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=Path, default=ROOT / "out" / "demo" / "pairs",
                    help="PAIRS Parquet file or folder (default: the demo's)")
    ap.add_argument("--n-pairs", type=int, default=48, help="the first N pairs")
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps")
    ap.add_argument("--global-batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--micro-batch-size", type=int, default=2, help="pairs per forward")
    ap.add_argument("--max-length", type=int, default=768)
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="default: min(512, max_length // 2)")
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip-grad", type=float, default=1.0)
    ap.add_argument("--gradient-checkpointing", choices=("off", "on"), default="off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--order", choices=("ecd", "file"), default="ecd",
                    help="ecd: TRL trains on the first ecd run's micro-batches (ecd runs "
                         "first); file: TRL takes the pairs in file order")
    ap.add_argument("--tokenisation", choices=("ecd", "trl"), default="ecd")
    ap.add_argument("--trl-save", choices=("checkpoint", "model", "none"),
                    default="checkpoint")
    ap.add_argument("--ecd-override", nargs="*", action="extend", default=[],
                    metavar="KEY=VALUE", help="more `ecd-ray train` overrides, e.g. "
                    "strategy=ddp num_workers=1 cpus_per_worker=2")
    ap.add_argument("--trl-arg", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="more DPOConfig arguments (values parsed as YAML)")
    ap.add_argument("--interval", type=float, default=0.5, help="RSS sampling period (s)")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="per command (s)")
    ap.add_argument("--work", type=Path, default=None, help="keep runs here (default: temp)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "train_vs_trl.json")
    args = ap.parse_args(argv)
    if args.global_batch % args.micro_batch_size:
        ap.error("--global-batch must be a multiple of --micro-batch-size")
    return args


def _yaml_args(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--trl-arg {item}: expected key=value")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["trl-worker"]:
        sys.exit(trl_worker(Path(argv[1])))
    args = parse_args(argv)
    from ecd_ray.hardware import cpu_info
    from ecd_ray.models import resolve_model

    check_ecd_overrides(args.ecd_override)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    ids = write_subset(args.pairs.resolve(), args.n_pairs, work / "pairs")
    ctx: dict[str, Any] = {
        "work": work.resolve(), "model_dir": model_dir, "pairs_file": work.resolve() / "pairs" /
        "pairs.parquet", "trl_args": _yaml_args(args.trl_arg),
        "max_prompt_tokens": args.max_prompt_tokens or min(512, args.max_length // 2)}
    workers = ecd_num_workers([f"pairs={ctx['pairs_file'].parent}", f"model={model_dir}",
                               *args.ecd_override])
    ctx["ecd_overrides"] = ecd_overrides(args, ctx, workers)
    ecd_num_workers([*ctx["ecd_overrides"], *args.ecd_override])  # fail early on a bad config
    modes = [m for m in MODES if m in args.modes]
    if args.order == "ecd":
        modes = [m for m in modes if m.startswith("ecd")] + \
            [m for m in modes if m.startswith("trl")]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    total = args.steps * args.global_batch
    file_order = [ids[i % len(ids)] for i in range(total)]
    order, order_source, order_exact = file_order, "file", True
    runs: dict[str, dict[str, Any]] = {}
    started = time.time()
    for mode in modes:
        print(f"[bench_train] {mode}: {LABELS[mode]} ...", flush=True)
        if mode.startswith("ecd"):
            run = run_ecd(mode, args, ctx, env)
            if args.order == "ecd" and order_source == "file" and run.get("ok"):
                micro = {int(k): v for k, v in run["micro_batches"].items()}
                order, order_exact = trl_order(micro, args.steps, args.micro_batch_size)
                order_source = mode
        else:
            run = run_trl(mode, args, ctx, order, env)
        runs[mode] = finish_run(run)
        print(f"[bench_train] {mode}: exit {run['returncode']}, {run['wall_s']:.1f} s, "
              f"peak tree RSS {run['rss']['peak_tree_rss_gib']:.2f} GiB", flush=True)
    cpu = cpu_info()
    record = {
        "benchmark": "train_vs_trl",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_train.py " + shlex.join(argv),
        "seconds": round(time.time() - started, 1),
        "cpu": {"model": cpu["model"], "logical_cpus": os.cpu_count(), "flags": cpu["flags"]},
        "versions": versions(),
        "settings": {
            "model": args.model, "model_dir": str(model_dir), "pairs": str(args.pairs),
            "n_pairs": args.n_pairs, "pair_ids": ids, "steps": args.steps,
            "global_batch": args.global_batch, "micro_batch_size": args.micro_batch_size,
            "ecd_num_workers": workers, "max_length": args.max_length,
            "max_prompt_tokens": ctx["max_prompt_tokens"], "precision": "float32",
            "optimizer": "AdamW", "lr": args.lr, "schedule": "cosine, no warm-up",
            "weight_decay": args.weight_decay, "clip_grad": args.clip_grad, "beta": args.beta,
            "gradient_checkpointing": args.gradient_checkpointing,
            "tokenisation": args.tokenisation, "order": args.order,
            "trl_order_from": order_source, "trl_micro_batches_equal_ecd": order_exact,
            "trl_save": args.trl_save, "ecd_overrides": args.ecd_override,
            "trl_args": ctx["trl_args"], "modes": modes, "sample_interval_s": args.interval,
        },
        "rss_method": (
            "psutil, every sample_interval_s, from the benchmark process (not measured): the "
            "command's process and its descendants, plus every process whose environment has "
            f"{TAG_ENV}=<a fresh id per command> (inherited by everything the command starts, "
            "Ray's GCS, raylet and workers included, even if re-parented). tree = peak over "
            "samples of the summed RSS; anon = the same for RSS - shared (private memory, "
            "shared libraries and Ray's object store not counted per process); training "
            "process = TRL's process, or each ecd process titled ray::RayTrainWorker"),
        "runs": runs,
        "goals": goal_ratios(runs),
        "goals_vs_trl_precompute": goal_ratios(runs, "trl_precompute"),
        "loss_agreement": loss_agreement(runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str))
    plot(record, args.out.with_suffix(".png"))
    print(table(record))
    print(f"[bench_train] wrote {args.out} and {args.out.with_suffix('.png')}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    if not all(r.get("ok") for r in runs.values()):
        print("[bench_train] some runs failed: see their log_tail in the JSON", file=sys.stderr)
    return record


if __name__ == "__main__":
    rec = main()
    sys.exit(0 if all(r.get("ok") for r in rec["runs"].values()) else 1)
