"""The GPU paths up to the hardware boundary: placement groups for tensor/pipeline-parallel
vLLM replicas, vLLM arguments, and config checks. The real CUDA run is marked `gpu`."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import requires_vllm

from ecd_ray.config import SAMPLE_SEEDS, ConfigError, VLLMConfig, load_config
from ecd_ray.engines.vllm_engine import engine_kwargs
from ecd_ray.hardware import cpu_info, has_native_bf16
from ecd_ray.pipeline.generate import actor_resources, generate, replica_bundles


def _cfg(model: Path, *extra: str):
    return load_config(None, [f"teacher.model={model}", "teacher.engine=vllm", *extra])


def test_tensor_parallel_replica_gets_one_bundle_per_gpu(tiny_model: Path) -> None:
    cfg = _cfg(tiny_model, "teacher.vllm.tensor_parallel_size=8", "teacher.num_gpus=8")
    assert replica_bundles(cfg) == [{"GPU": 1.0, "CPU": 1.0}] * 8
    args = actor_resources(cfg)
    assert args["num_gpus"] is None and "ray_remote_args_fn" in args  # vLLM's workers take them


def test_single_gpu_and_cpu_replicas_reserve_directly(tiny_model: Path) -> None:
    one = _cfg(tiny_model, "teacher.num_gpus=1")
    assert replica_bundles(one) is None
    assert actor_resources(one) == {"num_cpus": 1.0, "num_gpus": 1.0}
    cpu = _cfg(tiny_model, "teacher.num_cpus=2")
    assert actor_resources(cpu) == {"num_cpus": 2.0, "num_gpus": None}


def test_placement_group_is_created_with_the_right_shape(tiny_model: Path) -> None:
    """Runs the real remote-args function on a CPU-only Ray: the group is created (it stays
    pending without GPUs) with 2x4 bundles packed for pipeline parallelism."""
    import ray
    from ray.util.placement_group import remove_placement_group

    cfg = _cfg(tiny_model, "teacher.vllm.tensor_parallel_size=4",
               "teacher.vllm.pipeline_parallel_size=2", "teacher.num_gpus=8")
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        strategy = actor_resources(cfg)["ray_remote_args_fn"]()["scheduling_strategy"]
        pg = strategy.placement_group
        assert pg.bundle_specs == [{"GPU": 1.0, "CPU": 1.0}] * 8
        assert strategy.placement_group_capture_child_tasks
        remove_placement_group(pg)
    finally:
        ray.shutdown()


def test_vllm_arguments_one_schema_for_cpu_and_gpu() -> None:
    cfg = VLLMConfig(tensor_parallel_size=8, quantization="fp8", kv_cache_dtype="fp8",
                     gpu_memory_utilization=0.85, max_model_len=8192)
    gpu = engine_kwargs("/m", cfg, dtype="auto", seed=3, on_gpu=True)
    assert gpu["distributed_executor_backend"] == "ray" and gpu["tensor_parallel_size"] == 8
    assert gpu["quantization"] == "fp8" and gpu["gpu_memory_utilization"] == 0.85
    assert gpu["dtype"] == "auto"
    cpu = engine_kwargs("/m", VLLMConfig(), dtype="auto", seed=3, on_gpu=False)
    expected = "bfloat16" if has_native_bf16(cpu_info()["flags"]) else "float32"
    assert cpu["dtype"] == expected and "distributed_executor_backend" not in cpu
    assert cpu["enable_prefix_caching"] is True
    assert "gpu_memory_utilization" not in cpu


def test_gpu_count_must_match_the_parallel_layout(tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match="needs teacher.num_gpus=8"):
        _cfg(tiny_model, "teacher.vllm.tensor_parallel_size=8", "teacher.num_gpus=1")


def test_gpu_evolver_beside_a_gpu_teacher_is_refused(tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match="serve the evolver with vLLM's OpenAI server"):
        _cfg(tiny_model, "teacher.num_gpus=1", "evolution.mode=teacher",
             f"evolver={{model: {tiny_model}, engine: vllm, num_gpus: 1}}")


@requires_vllm
@pytest.mark.gpu
def test_vllm_on_cuda_generates(tmp_path: Path, tiny_model: Path) -> None:
    cfg = _cfg(tiny_model, f"output_dir={tmp_path}", f"seeds.path={SAMPLE_SEEDS}",
               "seeds.limit=16", "rounds=2", "teacher.num_gpus=1", "teacher.max_new_tokens=16",
               "teacher.min_new_tokens=2")
    manifest = generate(cfg)
    assert manifest["accounting"]["ok"] and manifest["counts"]["chains"] == 16
