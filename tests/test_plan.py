"""The resource planner: hand-computed memory numbers, refusals that say what to change, and
the `ecd-ray plan` entry point on the shipped job configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ecd_ray.config import RunConfig, TrainConfig
from ecd_ray.plan import (
    KNOWN_GPUS,
    KNOWN_MODELS,
    GpuSpec,
    ModelSpec,
    format_plan,
    kv_bytes_per_token,
    main_plan,
    plan_generation,
    plan_training,
    weight_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
H100 = KNOWN_GPUS["h100-80gb"]
L8B = KNOWN_MODELS["llama-3.1-8b"]
L70B = KNOWN_MODELS["llama-3.1-70b"]


def gen_cfg(tp: int = 8, num_gpus: float = 8, replicas: int = 2, max_model_len: int = 8192,
            util: float = 0.9, eager: bool = False, max_num_seqs: int = 128) -> RunConfig:
    # model_validate skips the file checks of load_config: the model folder need not exist.
    return RunConfig.model_validate({"teacher": {
        "engine": "vllm", "dtype": "bfloat16", "replicas": replicas, "num_gpus": num_gpus,
        "vllm": {"tensor_parallel_size": tp, "max_model_len": max_model_len,
                 "gpu_memory_utilization": util, "enforce_eager": eager,
                 "max_num_seqs": max_num_seqs}}})


def train_cfg(**kw: object) -> TrainConfig:
    base = {"num_workers": 16, "use_gpu": True, "zero_stage": 3, "dtype": "bfloat16",
            "micro_batch_size": 1, "grad_accum": 8, "max_length": 2048}
    return TrainConfig.model_validate({**base, **kw})


# --- model specs -----------------------------------------------------------------------------


def test_known_parameter_counts_match_the_published_models() -> None:
    assert KNOWN_MODELS["llama-3.1-8b"].n_params == 8_030_261_248
    assert KNOWN_MODELS["llama-3.1-70b"].n_params == 70_553_706_496
    assert KNOWN_MODELS["qwen2.5-7b"].n_params == 7_615_616_512
    assert KNOWN_MODELS["smollm2-135m"].n_params == 134_515_008


def test_gemma3_270m_spec_against_transformers_count() -> None:
    """The second embedded model's spec, against transformers' own parameter count of the
    architecture the embedded converter checks (built on the meta device: no weights)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from ecd_ray.config import GEMMA_MODEL
    from ecd_ray.models import embedded_model
    from ecd_ray.plan import _model_spec

    want = {k: v for k, v in embedded_model(GEMMA_MODEL).expected.items()
            if "." not in k and k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**want))
    real = sum(p.numel() for p in model.parameters())
    spec = KNOWN_MODELS["gemma3-270m"]
    # Gemma 3 layers have q/k norms (256 each) and two more RMSNorms (pre/post feed-forward,
    # 640 each) than a Llama layer; the Llama-style estimate leaves those out.
    norms = 18 * (2 * 256 + 2 * 640)
    assert spec.n_params == real - norms
    assert _model_spec(None, GEMMA_MODEL, "--teacher-spec") is spec


def test_from_config_json_on_the_embedded_smollm2(embedded_model: Path) -> None:
    spec = ModelSpec.from_config_json(embedded_model / "config.json")
    # transformers counts 134,515,008 parameters (embeddings tied to the LM head).
    assert spec.n_params == 134_515_008
    assert (spec.n_layers, spec.hidden_size, spec.n_kv_heads, spec.head_dim, spec.vocab_size) \
        == (30, 576, 3, 64, 49152)
    assert spec.tie_word_embeddings
    assert ModelSpec.from_config_json(embedded_model).n_params == spec.n_params  # a folder


def test_from_config_json_untied_llama_and_qwen_biases(tmp_path: Path) -> None:
    llama = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
             "vocab_size": 128256, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    assert ModelSpec.from_config_json(tmp_path).n_params == 8_030_261_248  # head_dim 4096/32
    qwen = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
            "vocab_size": 152064, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    assert ModelSpec.from_config_json(tmp_path).n_params == 7_615_616_512


def test_from_config_json_refuses_moe_and_non_llama(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"hidden_size": 4096, "num_hidden_layers": 32,
                             "num_attention_heads": 32, "intermediate_size": 14336,
                             "vocab_size": 32000, "num_local_experts": 8}))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ModelSpec.from_config_json(p)
    p.write_text(json.dumps({"n_embd": 768, "n_layer": 12}))
    with pytest.raises(ValueError, match="missing"):
        ModelSpec.from_config_json(p)


def test_spec_lookup_guess_and_gpu_parsing() -> None:
    assert ModelSpec.get("Llama-3.1-70B") is L70B
    assert ModelSpec.get("llama-3.3-70b") is L70B  # same architecture
    assert ModelSpec.guess("/mnt/models/Meta-Llama-3.1-8B-Instruct") is L8B
    assert ModelSpec.guess("/mnt/models/mystery") is None
    with pytest.raises(ValueError, match="unknown model spec"):
        ModelSpec.get("gpt-17")
    assert GpuSpec.get("H200-141GB").memory_gib == 141
    assert GpuSpec.get("rtx6000:48") == GpuSpec("rtx6000", 48.0)
    with pytest.raises(ValueError, match="unknown GPU"):
        GpuSpec.get("h9")


# --- generation ------------------------------------------------------------------------------


def test_weights_and_kv_bytes_per_token_by_hand() -> None:
    # 8B in bf16: 8,030,261,248 x 2 bytes = 14.96 GiB.
    assert weight_bytes(L8B) / GIB == pytest.approx(14.958, abs=1e-3)
    assert weight_bytes(L8B, "float32") == 2 * weight_bytes(L8B)
    # fp8 linear layers, 16-bit embeddings + LM head (2 x 128256 x 4096).
    emb = 2 * 128256 * 4096
    assert weight_bytes(L8B, quantization="fp8") == (L8B.n_params - emb) + 2 * emb
    # Llama-3.1-8B: 2 (K, V) x 32 layers x 8 KV heads x 128 x 2 bytes = 131072 B = 128 KiB.
    assert kv_bytes_per_token(L8B) == 2 * 32 * 8 * 128 * 2 == 131072
    assert kv_bytes_per_token(L8B, tp=2) == 65536  # KV heads sharded over the ranks
    assert kv_bytes_per_token(L8B, kv_bytes=1) == 65536  # fp8 KV cache
    # 70B at TP 8: one KV head per GPU; at TP 16 the 8 heads are replicated, still one each.
    assert kv_bytes_per_token(L70B, tp=8) == 2 * 80 * 1 * 128 * 2 == 40960
    assert kv_bytes_per_token(L70B, tp=16) == 40960
    assert kv_bytes_per_token(L70B, tp=8, pp=2) == 2 * 40 * 1 * 128 * 2


def test_8b_tp1_weights_in_the_plan() -> None:
    plan = plan_generation(gen_cfg(tp=1, num_gpus=1, replicas=1, max_model_len=4096), L8B, H100)
    assert plan.ok, plan.problems
    assert plan.numbers["weights_bytes_per_gpu"] / GIB == pytest.approx(14.96, abs=0.01)
    assert plan.numbers["kv_bytes_per_token_per_gpu"] == 131072


def test_70b_tp8_on_h100_fits_with_its_kv_budget() -> None:
    plan = plan_generation(gen_cfg(), L70B, H100)
    assert plan.ok, plan.problems
    n = plan.numbers
    weights = 70_553_706_496 * 2 / 8                    # bf16 weights over 8 GPUs
    budget = 0.9 * 80 * GIB                              # gpu_memory_utilization x memory
    reserve = 1.5 * GIB + 0.02 * 80 * GIB + 1.0 * GIB    # fixed + 2% + CUDA graphs
    kv = budget - weights - reserve
    assert n["weights_bytes_per_gpu"] == pytest.approx(weights)
    assert weights / GIB == pytest.approx(16.43, abs=0.01)
    assert n["kv_bytes_per_gpu"] / GIB == pytest.approx(51.47, abs=0.01)
    tokens = math.floor(kv / (40960 * 16)) * 16          # whole 16-token blocks
    assert n["kv_tokens_per_replica"] == tokens
    assert n["max_concurrent_seqs"] == tokens // 8192 == 164
    assert (n["gpus_per_replica"], n["total_gpus"]) == (8, 16)
    assert "fits" in format_plan(plan)
    json.dumps(plan.to_dict())  # serialisable


def test_70b_tp1_is_refused_naming_tensor_parallel_size() -> None:
    plan = plan_generation(gen_cfg(tp=1, num_gpus=1), L70B, H100)
    assert not plan.ok
    text = " ".join(plan.problems)
    assert "weights alone" in text
    assert "tensor_parallel_size to at least 2" in text
    assert "8 holds max_num_seqs=128" in text
    assert "REFUSED" in format_plan(plan)
    assert plan.to_dict()["ok"] is False


def test_fewer_than_one_full_length_sequence_is_refused() -> None:
    # 8B on a 24 GB L4 at 128k context: weights fit, one sequence's KV cache does not.
    cfg = gen_cfg(tp=1, num_gpus=1, max_model_len=131072, eager=True)
    plan = plan_generation(cfg, L8B, KNOWN_GPUS["l4-24gb"])
    assert not plan.ok
    text = plan.problems[0]
    assert "fewer than one sequence" in text
    assert "lower teacher.vllm.max_model_len" in text
    assert "tensor_parallel_size to at least 2" in text


def test_gpu_count_and_head_divisibility_problems() -> None:
    plan = plan_generation(gen_cfg(tp=8, num_gpus=4), L70B, H100)
    assert any("teacher.num_gpus=8" in p for p in plan.problems)
    plan = plan_generation(gen_cfg(tp=8), KNOWN_MODELS["qwen2.5-7b"], H100)  # 28 heads
    assert any("tensor_parallel_size 8 must divide" in p for p in plan.problems)
    plan = plan_generation(gen_cfg(tp=1, num_gpus=0.5, util=0.9), L8B, H100)
    assert any("gpu_memory_utilization <= 0.5" in p for p in plan.problems)
    plan = plan_generation(gen_cfg(tp=1, num_gpus=0), KNOWN_MODELS["smollm2-135m"], H100)
    assert plan.ok and any("CPU config" in n for n in plan.notes)
    remote = gen_cfg(tp=8, num_gpus=0)
    remote.teacher.engine = "openai"  # a server elsewhere: the actors reserve no GPU
    plan = plan_generation(remote, L70B, H100)
    assert plan.ok and [n for n in plan.notes if "own server" in n]


# --- training --------------------------------------------------------------------------------


def test_zero3_8b_on_16_gpus_fits() -> None:
    plan = plan_training(train_cfg(), L8B, H100)
    assert plan.ok, plan.problems
    n, P = plan.numbers, 8_030_261_248
    assert n["params_bytes"] == pytest.approx(2 * P / 16)
    assert n["grads_bytes"] == pytest.approx(2 * P / 16)
    assert n["optimizer_gpu_bytes"] == pytest.approx(12 * P / 16)  # fp32 master + m + v
    tokens = 1 * 2 * 2048                                           # chosen + rejected
    # GPU defaults: gradient checkpointing (each layer's bf16 input + one layer's activations)
    # and chunked log-probs (one 1024-token slice of logits at a time)
    assert n["activations_bytes"] == 4096 * tokens * 2 * 32 + 34 * 4096 * tokens
    assert n["logits_bytes"] == 1024 * 128256 * (2 + 8)
    assert n["total_bytes_per_gpu"] / GIB == pytest.approx(13.21, abs=0.01)
    # the textbook path: every layer's activations and the batch's full logits
    full = plan_training(train_cfg(gradient_checkpointing="off", logprobs="full"), L8B,
                         H100).numbers
    assert full["activations_bytes"] == 34 * 4096 * tokens * 32
    assert full["logits_bytes"] == tokens * 128256 * (2 + 8)
    assert full["total_bytes_per_gpu"] / GIB == pytest.approx(32.35, abs=0.01)


def test_reference_stage_layout_memory_and_time() -> None:
    """The reference pool has the training workers' shape: one bf16 actor per GPU on GPUs,
    one fp32 actor per worker on CPUs; too big for one GPU names reference_gpus."""
    from ecd_ray.train.reference import reference_layout

    n, P = plan_training(train_cfg(), L8B, H100).numbers, 8_030_261_248
    assert (n["reference_replicas"], n["reference_gpus"]) == (16, 1)
    work = 4 * 4096 * (8 * 2 * 2048) * 2 + 1024 * 128256 * 8
    assert n["reference_bytes_per_device"] == pytest.approx(2 * P + work + 2 * GIB)
    # 2 FLOPs per parameter per token, 2 x 2048 tokens a pair, 16 GPUs at 30% of 989 TFLOPS
    assert n["reference_s_per_1k_pairs"] == pytest.approx(
        1000 * 2 * P * 4096 / (16 * 0.3 * 989e12))
    assert reference_layout(train_cfg()).__dict__ == {"replicas": 16, "cpus": 1.0, "gpus": 1,
                                                      "dtype": "bfloat16"}
    cpu = train_cfg(use_gpu=False, dtype="auto", num_workers=4, cpus_per_worker=8)
    assert reference_layout(cpu).__dict__ == {"replicas": 4, "cpus": 8.0, "gpus": 0,
                                              "dtype": "float32"}
    big = plan_training(train_cfg(), L70B, KNOWN_GPUS["l40s-48gb"])
    assert any("set reference_gpus=4" in p for p in big.problems), big.problems
    spread = plan_training(train_cfg(reference_gpus=4), L70B, KNOWN_GPUS["l40s-48gb"]).numbers
    assert spread["reference_replicas"] == 4
    with pytest.raises(ValueError, match="reference_gpus"):
        reference_layout(train_cfg(reference_gpus=32))


def test_stage0_8b_on_one_gpu_is_refused_naming_zero_stage_and_offload() -> None:
    plan = plan_training(train_cfg(num_workers=1, zero_stage=0), L8B, H100)
    assert not plan.ok
    text = plan.problems[0]
    # bf16 weights and gradients + fp32 master, m and v: 2 + 2 + 12 bytes/param alone
    assert plan.numbers["total_bytes_per_gpu"] > 16 * L8B.n_params
    assert "zero_stage=3 with num_workers>=2" in text  # 16 B/param over 2: ~60 GiB each
    assert "offload_optimizer=true" in text


def test_offload_and_ddp_and_fp32() -> None:
    off = plan_training(train_cfg(offload_optimizer=True), L8B, H100).numbers
    assert off["optimizer_gpu_bytes"] == 0
    assert off["host_bytes_per_worker"] == pytest.approx((12 + 4) * L8B.n_params / 16)
    ddp = plan_training(train_cfg(strategy="ddp", num_workers=2), L8B, H100)
    assert ddp.numbers["zero_stage"] == 0 and not ddp.ok
    fp32 = plan_training(train_cfg(dtype="float32"), L8B, H100).numbers
    assert fp32["optimizer_bytes"] == pytest.approx(8 * L8B.n_params / 16)  # m + v only
    bad = plan_training(train_cfg(zero_stage=2, offload_params=True), L8B, H100)
    assert "offload_params needs zero_stage=3" in bad.problems


# --- `ecd-ray plan` --------------------------------------------------------------------------


def test_main_plan_on_shipped_configs(capsys: pytest.CaptureFixture[str]) -> None:
    gen = ROOT / "jobs" / "configs" / "gen_70b_tp8.yaml"
    train = ROOT / "jobs" / "configs" / "train_8b_zero3_2nodes.yaml"
    assert main_plan(gen, [], "h100-80gb", None, None, train_config=train) == 0
    out = capsys.readouterr().out
    assert "Generation plan: teacher llama-3.1-70b" in out  # guessed from the model path
    assert "164 per replica" in out
    assert "Training plan: policy llama-3.1-8b on 16 x h100-80gb" in out
    assert "not checked for this plan" in out  # the model folders do not exist here
    # A training YAML given as --config is recognised; train.* overrides go to it.
    assert main_plan(train, ["train.num_workers=1", "zero_stage=0"], "h100-80gb",
                     None, None) == 1
    assert "zero_stage=3" in capsys.readouterr().out


def test_main_plan_refusals_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       embedded_model: Path) -> None:
    gen = ROOT / "jobs" / "configs" / "gen_70b_tp8.yaml"
    over = ["teacher.vllm.tensor_parallel_size=1", "teacher.num_gpus=1"]
    assert main_plan(gen, over, "h100-80gb", None, None) == 1
    assert "tensor_parallel_size to at least 2" in capsys.readouterr().out
    assert main_plan(gen, ["teacher.vllm.tensor_parallel_siz=1"], "h100-80gb", None, None) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main_plan(gen, [], "h9", None, None) == 2
    assert main_plan(gen, ["teacher.model=/nowhere/custom"], "h100-80gb", None, None) == 2
    assert "--teacher-spec" in capsys.readouterr().err
    # An explicit spec (a config.json path) replaces the guess.
    small = ["teacher.vllm.tensor_parallel_size=1", "teacher.num_gpus=1"]
    assert main_plan(gen, small, "l4-24gb", str(embedded_model / "config.json"), None) == 0
    assert "teacher smollm2-135m-instruct" in capsys.readouterr().out
    assert main_plan(None, [], "h100-80gb", None, None) == 2
