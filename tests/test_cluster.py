"""Cluster paths on one machine: a Ray head with token auth and `ray job submit`, and the
generation pipeline spread over a simulated 2-node cluster.

Everything started here binds 127.0.0.1, lives in its own temp dir, and is stopped by the
process id this test got when it started it (never `ray stop`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from ecd_ray.config import SAMPLE_SEEDS, load_config
from ecd_ray.pipeline.generate import generate

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process group this test started (start_new_session=True), by its id."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head --block` on 127.0.0.1 with token auth; yields (dashboard URL, env)."""
    temp = Path(tempfile.mkdtemp(prefix="ecdray-", dir="/tmp"))  # short: socket path limits
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dash = _free_port()
    log = (temp / "head.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={_free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp}", "--num-cpus=4"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                req = urllib.request.Request(  # noqa: S310 - our own local head
                    f"{url}/api/version",
                    headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
                urllib.request.urlopen(req, timeout=5)  # noqa: S310
                break
            except OSError as exc:
                if proc.poll() is not None or time.time() > deadline:
                    tail = (temp / "head.log").read_text()[-2000:]
                    raise RuntimeError(f"Ray head did not come up: {tail}") from exc
                time.sleep(2)
        yield url, env
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_the_cpu_demo_job(ray_head: tuple[str, dict[str, str]],
                                              tmp_path: Path, tiny_model: Path) -> None:
    url, env = ray_head
    # Without the token the Jobs API refuses the request.
    unauth = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    unauth["RAY_AUTH_TOKEN"] = "not-the-token"
    denied = subprocess.run([str(BIN / "ray"), "job", "list", "--address", url], env=unauth,
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0
    runtime_env = {"excludes": [".venv", "out", ".git", "*.parquet"],
                   "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "jobs.cpu_demo", "--no-train", f"output_dir={tmp_path}",
           "run_name=job", "seeds.limit=4", "rounds=1", "teacher.engine=transformers",
           f"teacher.model={tiny_model}", "teacher.max_new_tokens=8",
           "teacher.min_new_tokens=2", "teacher.num_cpus=1"]
    deadline = time.monotonic() + 480  # the head's job agent can take minutes to register
    while True:  # on a loaded 2-core machine
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(10)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    manifest = json.loads((tmp_path / "job" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["accounting"]["ok"]
    assert manifest["counts"]["chains"] == 4


def test_generation_runs_on_both_nodes_of_a_two_node_cluster(tmp_path: Path,
                                                             tiny_model: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    # Head: 3 CPUs (one 2-CPU actor + a CPU for Ray Data's repartition and IO tasks);
    # worker node: 2 CPUs. Two 2-CPU replicas cannot share a node: one actor per node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    try:
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = load_config(None, [
            f"output_dir={tmp_path}", "run_name=two", f"seeds.path={SAMPLE_SEEDS}",
            "seeds.limit=8", "rounds=1", f"teacher.model={tiny_model}",
            "teacher.engine=transformers", "teacher.replicas=2", "teacher.num_cpus=2",
            "teacher.batch_size=2", "teacher.max_new_tokens=8", "teacher.min_new_tokens=2"])
        manifest = generate(cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert manifest["accounting"]["ok"]
    workers = pads.dataset(tmp_path / "two" / "evolutions").to_table(
        columns=["worker"])["worker"].to_pylist()
    nodes = {w.split(":")[0] for w in workers}
    assert len(nodes) == 2, workers
