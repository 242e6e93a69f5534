"""The shipped job configs, job entrypoints and cluster definitions: every job config validates
(with its model and pairs folders pointed at temporary stand-ins), its first lines give its
exact commands, the GPU ones fit their GPUs by the planner, and every cluster file parses with
the structure its tool expects and never opens the dashboard on 0.0.0.0."""

from __future__ import annotations

import ast
import json
import re
import runpy
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ecd_ray.config import EMBEDDED_MODEL, RunConfig, TrainConfig, load_config, load_train_config
from ecd_ray.plan import KNOWN_GPUS, ModelSpec, plan_generation, plan_training

ROOT = Path(__file__).resolve().parents[1]
JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
CLUSTER_FILES = sorted(p for p in (ROOT / "clusters").iterdir() if p.is_file())
LAUNCHERS = [ROOT / "clusters" / "aws-gpu.yaml", ROOT / "clusters" / "gcp-gpu.yaml"]
ENTRYPOINTS = sorted(p for p in (ROOT / "jobs").glob("*.py") if p.name != "__init__.py")


def is_train_config(path: Path) -> bool:
    data = yaml.safe_load(path.read_text())
    return isinstance(data.get("pairs"), str) or "zero_stage" in data


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path) -> dict[str, Path]:
    """A model folder holding a copied config.json and a pairs folder with one Parquet file."""
    root = tmp_path_factory.mktemp("stand-ins")
    model = root / "model"
    model.mkdir()
    shutil.copy(embedded_model / "config.json", model / "config.json")
    pairs = root / "pairs"
    pairs.mkdir()
    pq.write_table(pa.table({"pair_id": ["p0"]}), pairs / "part-0.parquet")
    return {"model": model, "pairs": pairs}


def load_shipped(path: Path, stand_ins: dict[str, Path]) -> RunConfig | TrainConfig:
    if is_train_config(path):
        return load_train_config(path, [f"model={stand_ins['model']}",
                                        f"pairs={stand_ins['pairs']}"])
    data = yaml.safe_load(path.read_text())
    model = data.get("teacher", {}).get("model", EMBEDDED_MODEL)
    return load_config(path, [] if model == EMBEDDED_MODEL else
                       [f"teacher.model={stand_ins['model']}"])


# --- jobs/configs ----------------------------------------------------------------------------


def test_the_expected_job_configs_ship() -> None:
    assert {p.name for p in JOB_CONFIGS} >= {
        "cpu_demo.yaml", "gen_8b_1gpu.yaml", "gen_70b_tp8.yaml", "train_8b_zero3_2nodes.yaml"}


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_validates(path: Path, stand_ins: dict[str, Path]) -> None:
    cfg = load_shipped(path, stand_ins)
    assert isinstance(cfg, TrainConfig if is_train_config(path) else RunConfig)


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_starts_with_its_commands(path: Path) -> None:
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert lines[0].startswith("# "), "the first line is a comment with a command"
    entry = "jobs.train" if is_train_config(path) else "jobs.generate"
    rel = f"jobs/configs/{path.name}"
    assert f"python -m {entry} --config {rel}" in lines[0]
    submit = next(line for line in header if "ray job submit" in line)
    assert "--runtime-env-json" in submit and f"-- python -m {entry} --config {rel}" in submit
    env = json.loads(re.search(r"--runtime-env-json '([^']*)'", submit).group(1))
    assert env["working_dir"] == "."
    assert "http://127.0.0.1:8265" in text


def test_gpu_job_configs_hold_the_documented_settings(stand_ins: dict[str, Path]) -> None:
    configs = ROOT / "jobs" / "configs"
    g8 = load_shipped(configs / "gen_8b_1gpu.yaml", stand_ins)
    assert (g8.teacher.engine, g8.teacher.num_gpus, g8.teacher.replicas) == ("vllm", 1, 1)
    assert g8.teacher.vllm.tensor_parallel_size == 1 and g8.evolution.mode == "teacher"
    g70 = load_shipped(configs / "gen_70b_tp8.yaml", stand_ins)
    v = g70.teacher.vllm
    assert (v.tensor_parallel_size, v.max_model_len, v.gpu_memory_utilization) == (8, 8192, 0.9)
    assert (g70.teacher.replicas, g70.teacher.num_gpus, g70.evolution.mode) == (2, 8, "teacher")
    t = load_shipped(configs / "train_8b_zero3_2nodes.yaml", stand_ins)
    assert (t.num_workers, t.use_gpu, t.zero_stage, t.dtype) == (16, True, 3, "bfloat16")
    assert (t.micro_batch_size, t.grad_accum, t.max_length) == (1, 8, 2048)
    # The placeholders the comments describe: shared storage and a models mount.
    raw = yaml.safe_load((configs / "gen_70b_tp8.yaml").read_text())
    assert raw["teacher"]["model"].startswith("/mnt/models/")


def test_gpu_job_configs_fit_on_h100(stand_ins: dict[str, Path]) -> None:
    configs, h100 = ROOT / "jobs" / "configs", KNOWN_GPUS["h100-80gb"]
    for name, spec in (("gen_8b_1gpu.yaml", "llama-3.1-8b"), ("gen_70b_tp8.yaml", "llama-3.1-70b")):
        plan = plan_generation(load_shipped(configs / name, stand_ins), ModelSpec.get(spec), h100)
        assert plan.ok, (name, plan.problems)
    tcfg = load_shipped(configs / "train_8b_zero3_2nodes.yaml", stand_ins)
    plan = plan_training(tcfg, ModelSpec.get("llama-3.1-8b"), h100)
    assert plan.ok, plan.problems


# --- jobs/*.py -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ENTRYPOINTS, ids=lambda p: p.name)
def test_entrypoint_docstring_shows_both_commands(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "python -m jobs." in doc
    assert "ray job submit" in doc


@pytest.mark.parametrize(("module", "command"), [("jobs.generate", "generate"),
                                                 ("jobs.train", "train")])
def test_entrypoint_calls_the_cli(module: str, command: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import ecd_ray.cli

    seen: list[list[str]] = []
    monkeypatch.setattr(ecd_ray.cli, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", [module, "--config", "x.yaml", "rounds=2"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__")
    assert exit_info.value.code == 0
    assert seen == [[command, "--config", "x.yaml", "rounds=2"]]


# --- clusters/ -------------------------------------------------------------------------------


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.mark.parametrize("path", [p for p in CLUSTER_FILES if p.suffix == ".yaml"],
                         ids=lambda p: p.name)
def test_cluster_yaml_parses(path: Path) -> None:
    assert docs(path), f"{path.name} holds no YAML document"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_structure(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] in {"aws", "gcp"}
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "a GPU worker type"
    for t in gpu_types.values():
        assert t["resources"]["CPU"] > 0 and t["max_workers"] >= t["min_workers"] >= 0
        assert t["node_config"]
    assert any(t["resources"]["GPU"] == 8 for t in gpu_types.values())
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert any("[gpu]" in c for c in cfg["setup_commands"])
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60")


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_matches_rays_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def gpu_workers(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in cluster_spec["workerGroupSpecs"]
            if any(c["resources"]["limits"].get("nvidia.com/gpu", 0) > 0
                   for c in containers(g["template"]))]


def check_ray_cluster_spec(spec: dict[str, Any]) -> None:
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    for group in [head, *spec["workerGroupSpecs"]]:
        # KubeRay's rayStartParams is map[string]string.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    assert containers(head["template"])[0]["image"]
    workers = gpu_workers(spec)
    assert workers, "a worker group requesting nvidia.com/gpu"
    for g in workers:
        assert g["maxReplicas"] >= g["replicas"] >= g["minReplicas"] >= 0
        res = containers(g["template"])[0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 8


def test_kuberay_raycluster() -> None:
    (rc,) = docs(ROOT / "clusters" / "kuberay-raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    check_ray_cluster_spec(rc["spec"])
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_kuberay_rayjob() -> None:
    (job,) = docs(ROOT / "clusters" / "kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m jobs.generate --config jobs/configs/gen_70b_tp8.yaml"
    assert (ROOT / "jobs" / "configs" / "gen_70b_tp8.yaml").is_file()
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] and env["env_vars"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    check_ray_cluster_spec(spec["rayClusterSpec"])
    # teacher.replicas 2 x tensor_parallel_size 8 = 16 GPUs.
    gpus = sum(g["replicas"] * containers(g["template"])[0]["resources"]["limits"]
               ["nvidia.com/gpu"] for g in gpu_workers(spec["rayClusterSpec"]))
    assert gpus == 16


def test_kuberay_networkpolicy_admits_the_operator_on_8265_only() -> None:
    (pol,) = docs(ROOT / "clusters" / "kuberay-networkpolicy.yaml")
    assert pol["kind"] == "NetworkPolicy"
    label = pol["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        assert f"app.kubernetes.io/component: {label}" in (ROOT / "clusters" / name).read_text()
    operator_rule = next(r for r in pol["spec"]["ingress"] if "ports" in r)
    assert [p["port"] for p in operator_rule["ports"]] == [8265]


DASHBOARD_ON_ALL = re.compile(r"dashboard[-_]host[\"'=:\s]*0\.0\.0\.0")


def test_no_file_opens_the_dashboard_on_all_interfaces() -> None:
    files = [*CLUSTER_FILES, *JOB_CONFIGS, *ENTRYPOINTS]
    assert files
    for path in files:
        text = path.read_text()
        assert not DASHBOARD_ON_ALL.search(text), path.name
        for doc in (docs(path) if path.suffix == ".yaml" else []):
            assert "0.0.0.0" not in json.dumps(doc), path.name


def test_images_match_the_ray_pin() -> None:
    pin = re.search(r'"ray\[[^\]]*\]>=(\d+\.\d+),', (ROOT / "pyproject.toml").read_text())
    assert pin is not None
    tag = f"rayproject/ray:{pin.group(1)}."
    assert tag in (ROOT / "clusters" / "Dockerfile.gpu").read_text()
    for path in LAUNCHERS:
        assert yaml.safe_load(path.read_text())["docker"]["image"].startswith(tag)
