"""Node loss: the node that runs the engine actors leaves a 2-node cluster mid-run.

A ``ray.cluster_utils.Cluster`` on this machine: a head (3 CPUs) and a worker node (2 CPUs).
While the pool starts, a placement group holds 2 of the head's CPUs, so both 1-CPU chain
actors land on the worker node. Once the first shards are on disk (and most seeds are still to
do), a background thread releases the placeholder (the head now has room for both actors) and
removes the worker node (``Cluster.remove_node``: its raylet stops, and with it the actors).
Ray restarts the actors on the head; the driver finds the shards they wrote but never
reported and queues their unwritten seeds again. The run must finish on the head with every
seed written exactly once: the manifest's accounting says so, and so does a count of the seed
ids in ``evolutions/`` made here, shard by shard. The same run without the loss, first and on
the same cluster, gives the seconds the loss cost.

A multi-GPU (tensor-parallel) replica reserves a placement group instead; the second test
checks, with Ray's logical GPUs, that a group whose node is lost is placed again elsewhere.

Everything started here is stopped in ``finally`` (``ray.shutdown``, ``Cluster.shutdown``);
each test then checks that no process the cluster started (the lost node's included) is left.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from ecd_ray.config import SAMPLE_SEEDS, RunConfig, load_config
from ecd_ray.pipeline.generate import ACTORS_FILE, actor_resources, generate
from ecd_ray.seeds import iter_seeds

N_SEEDS = 30
REMOVE_AFTER_SHARDS = 2  # 2 shards of <= 3 chains: at most 6 of 30 seeds done at the loss
DEADLINE_S = 420  # a recovery that hangs fails the test instead of blocking CI

Procs = set[tuple[int, float]]  # (pid, start time): a process, never a reused pid


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (SIGALRM)."""

    def fire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the node-loss test ran over {seconds} s: a recovery that hangs?")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _descendants() -> Procs:
    """Every live process this test process started, directly or not (the cluster's nodes
    and, under their raylets, the actors and workers)."""
    import psutil

    out = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.add((proc.pid, proc.create_time()))
        except psutil.NoSuchProcess:
            pass
    return out


def _still_alive(procs: Procs, timeout_s: float = 60.0) -> list[int]:
    """The pids of ``procs`` still running after up to ``timeout_s``."""
    import psutil

    def alive() -> list[int]:
        out = []
        for pid, started in procs:
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.monotonic() + timeout_s
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@contextmanager
def _cluster(seen: Procs, **head: Any) -> Iterator[Any]:
    """A local ``Cluster`` (head only) with this process connected to it. On exit: disconnect,
    shut the cluster down, and check that none of its processes is left: those running at the
    end, and those added to ``seen`` on the way (a removed node's, snapshotted before)."""
    import ray
    from ray.cluster_utils import Cluster

    before = _descendants()
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        ray.init(address=cluster.address)
        yield cluster
    finally:
        seen.update(_descendants())
        ray.shutdown()
        cluster.shutdown()
    left = _still_alive(seen - before)
    assert not left, f"process(es) {left} outlived the cluster"


def _config(tmp_path: Path, model: Path, name: str) -> RunConfig:
    return load_config(None, [
        f"output_dir={tmp_path}", f"run_name={name}", f"seeds.path={SAMPLE_SEEDS}",
        f"seeds.limit={N_SEEDS}", "rounds=2", f"teacher.model={model}",
        "teacher.engine=transformers", "teacher.dtype=float32", "teacher.replicas=2",
        "teacher.num_cpus=1", "teacher.batch_size=2", "teacher.max_new_tokens=16",
        "teacher.min_new_tokens=16", "scheduler.max_chains_per_actor=2",
        "scheduler.flush_rows=3", "scheduler.flush_seconds=2",
        "scheduler.engine_start_timeout_s=180", "pairs.policy=all",
        "pairs.truncated_chosen=keep"])


def _shards(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "evolutions").glob("part-*.parquet"))


class _NodeRemover(threading.Thread):
    """Once ``after`` shards are in ``run_dir/evolutions``: snapshot the processes into
    ``seen``, free the head (remove the placeholder placement group), remove ``node``."""

    def __init__(self, cluster: Any, node: Any, placeholder: Any, run_dir: Path, after: int,
                 seen: Procs):
        super().__init__(daemon=True)
        self.cluster, self.node, self.placeholder = cluster, node, placeholder
        self.run_dir, self.after, self.seen = run_dir, after, seen
        self.stop = threading.Event()
        self.removed_at: float | None = None
        self.shards_then: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        from ray.util import remove_placement_group

        try:
            while not self.stop.wait(0.2):
                shards = _shards(self.run_dir)
                if len(shards) >= self.after:
                    self.shards_then = [p.name for p in shards]
                    self.seen.update(_descendants())
                    remove_placement_group(self.placeholder)
                    self.removed_at = time.time()
                    self.cluster.remove_node(self.node)
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test's main thread
            self.error = exc


def _log_time(run_dir: Path, pattern: str) -> float | None:
    """Unix time of the first line of ``logs/generate.log`` matching ``pattern``."""
    for line in (run_dir / "logs" / "generate.log").read_text().splitlines():
        if re.search(pattern, line):
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _seed_counts(run_dir: Path) -> Counter[str]:
    """Chains per seed id, read shard by shard (not through the manifest's code)."""
    counts: Counter[str] = Counter()
    for shard in _shards(run_dir):
        counts.update(pq.read_table(shard, columns=["seed_id"])["seed_id"].to_pylist())
    return counts


def _workers(run_dir: Path) -> dict[str, set[str]]:
    """Node ids that wrote each shard (the ``worker`` column is ``node_id:pid``)."""
    return {p.name: {w.split(":")[0] for w in
                     pq.read_table(p, columns=["worker"])["worker"].to_pylist()}
            for p in _shards(run_dir)}


@pytest.mark.slow
def test_losing_the_engine_node_mid_run_loses_and_doubles_no_seed(
        tmp_path: Path, tiny_model: Path, record_property: Any) -> None:
    import ray
    from ray.util import placement_group

    base_cfg, cfg = _config(tmp_path, tiny_model, "base"), _config(tmp_path, tiny_model, "loss")
    seen: Procs = set()
    remover = None
    try:
        with _deadline(DEADLINE_S), _cluster(seen, num_cpus=3) as cluster:
            head_id = cluster.head_node.node_id
            # Only the head exists yet: the placeholder takes 2 of its 3 CPUs, which leaves
            # one CPU for the driver's Ray Data tasks and none for a chain actor.
            placeholder = placement_group([{"CPU": 2}], strategy="STRICT_PACK")
            ray.get(placeholder.ready(), timeout=60)
            node = cluster.add_node(num_cpus=2)
            cluster.wait_for_nodes()
            lost_id = node.node_id

            t0 = time.time()
            base = generate(base_cfg)  # the same run without the loss
            base_s = time.time() - t0
            assert set().union(*_workers(base_cfg.run_dir).values()) == {lost_id}

            remover = _NodeRemover(cluster, node, placeholder, cfg.run_dir,
                                   REMOVE_AFTER_SHARDS, seen)
            remover.start()
            started = time.time()
            manifest = generate(cfg)
            loss_s = time.time() - started
    finally:
        if remover is not None:
            remover.stop.set()
            remover.join(timeout=60)
    assert remover.error is None, remover.error
    # The snapshot before the removal saw the lost node's chain actors (the first two
    # recorded; their replacements had ended with the run before the last snapshot).
    lost_actors = {a["pid"] for a in json.loads((cfg.run_dir / ACTORS_FILE).read_text())[:2]}
    assert lost_actors <= {pid for pid, _ in seen}
    assert base["accounting"]["ok"] and base["actor_restarts"] == 0

    # The loss happened mid-run: after some shards, with most seeds still to do.
    assert remover.removed_at is not None, "the run ended before the node was removed"
    at_loss = sum(pq.read_metadata(cfg.run_dir / "evolutions" / n).num_rows
                  for n in remover.shards_then)
    assert 0 < at_loss <= N_SEEDS // 2, at_loss

    # Every seed exactly once: the manifest's accounting, and an independent count.
    acct = manifest["accounting"]
    assert manifest["status"] == "complete" and acct["ok"], acct
    assert acct["chains"] == N_SEEDS and acct["duplicate_chains"] == 0
    assert acct["missing_chains"] == 0
    expected = {s["seed_id"] for s, _ in iter_seeds(cfg.seeds) if s is not None}
    assert len(expected) == N_SEEDS
    counts = _seed_counts(cfg.run_dir)
    lost = len(expected - set(counts))
    doubled = sum(n - 1 for n in counts.values())
    assert (lost, doubled, set(counts) - expected) == (0, 0, set())

    # Both actors were on the lost node; each was restarted once, on the head, and the run
    # finished there.
    assert manifest["actor_restarts"] == 2
    assert [e["worker"].split(":")[0] for e in manifest["engines"]] == [head_id, head_id]
    nodes = _workers(cfg.run_dir)
    assert all(nodes[n] == {lost_id} for n in remover.shards_then), nodes
    assert set().union(*nodes.values()) == {lost_id, head_id}

    detected = _log_time(cfg.run_dir, r"chain actor \d+ failed")
    back = [_log_time(cfg.run_dir, rf"chain actor {i} back") for i in (0, 1)]
    figures = {
        "seeds": N_SEEDS, "seeds_on_disk_at_loss": at_loss, "seeds_lost": lost,
        "seeds_duplicated": doubled, "actor_restarts": manifest["actor_restarts"],
        "removed_at_s": round(remover.removed_at - started, 1),
        "detected_after_s": round(detected - remover.removed_at, 1) if detected else None,
        "actors_back_after_s": [round(t - remover.removed_at, 1) if t else None
                                for t in back],
        "wall_s": round(loss_s, 1), "wall_without_loss_s": round(base_s, 1),
        "extra_s": round(loss_s - base_s, 1),
        # the chain phase alone: the Ray Data stage after it varies a lot on a busy machine
        "chains_s": manifest["timings"]["chains_s"],
        "chains_without_loss_s": base["timings"]["chains_s"],
        "extra_chains_s": round(manifest["timings"]["chains_s"] - base["timings"]["chains_s"],
                                1),
    }
    for key, value in figures.items():
        record_property(key, value)
    print("node loss:", json.dumps(figures))


def test_a_multi_gpu_replica_s_placement_group_moves_off_a_lost_node(tiny_model: Path) -> None:
    """A tensor-parallel replica's placement group (``actor_resources``) whose node is lost is
    placed again on a node with room, and the restarted actor and its child tasks run there.
    The GPUs are Ray's logical ones: nothing here touches CUDA."""
    import ray
    from ray.util import placement_group, remove_placement_group

    class Where:  # defined here, so Ray pickles it by value (workers cannot import this file)
        """A stand-in for a multi-GPU chain actor: says where it (and a child task) runs."""

        def where(self) -> tuple[str, str]:
            @ray.remote(num_cpus=0.5)
            def child() -> str:  # stands for vLLM's tensor-parallel workers in the group
                return ray.get_runtime_context().get_node_id()

            return ray.get_runtime_context().get_node_id(), ray.get(child.remote(), timeout=60)

    cfg = load_config(None, [f"teacher.model={tiny_model}", "teacher.engine=vllm",
                             "teacher.vllm.tensor_parallel_size=2", "teacher.num_gpus=2"])
    args = actor_resources(cfg)
    seen: Procs = set()
    with _deadline(240), _cluster(seen, num_cpus=3, num_gpus=2) as cluster:
        placeholder = placement_group([{"GPU": 2}])  # the head's GPUs, until the loss
        ray.get(placeholder.ready(), timeout=60)
        node = cluster.add_node(num_cpus=3, num_gpus=2)
        cluster.wait_for_nodes()
        actor = ray.remote(Where).options(
            num_cpus=args["num_cpus"], max_restarts=1, max_task_retries=0,
            **args["ray_remote_args_fn"]()).remote()
        assert ray.get(actor.where.remote(), timeout=120) == (node.node_id,) * 2
        seen.update(_descendants())
        remove_placement_group(placeholder)
        cluster.remove_node(node)
        deadline = time.monotonic() + 120
        while True:
            try:
                where = ray.get(actor.where.remote(), timeout=60)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        assert where == (cluster.head_node.node_id,) * 2
