"""Resource planner: will a generation or training config fit on a given GPU, and if not, what to
change. Pure Python (no Ray, no torch): it reads a model's architecture (``config.json`` or a
table of known models) and applies the memory rules stated next to each formula below.

Units: bytes in the arithmetic; GiB (2**30 bytes) in the printed tables.

Generation (vLLM, per GPU of one replica of ``tp`` × ``pp`` GPUs):

* weights = bytes per parameter × P / (tp × pp). bf16/fp16 2 bytes, fp32 4, fp8/int8 1 for the
  linear layers, AWQ/GPTQ int4 0.5 + 2.5/128 (an fp16 scale and a packed zero per group of 128)
  for the linear layers; with quantization the embeddings and the LM head stay 16-bit.
* KV cache per token = 2 (K and V) × (layers / pp) × KV heads per GPU × head_dim × KV bytes.
  vLLM shards KV heads across the tensor-parallel ranks; when there are fewer KV heads than
  ranks each head is replicated, so a GPU holds max(1, n_kv_heads / tp) heads (tp must divide
  n_kv_heads or be a multiple of it).
* reserve = 1.5 GiB (CUDA context, NCCL, sampler) + 2 % of the GPU's memory (the activation
  peak of vLLM's profiling forward pass, allocator fragmentation) + 1 GiB for CUDA graphs when
  ``enforce_eager`` is false. An estimate: vLLM measures the real figure at start-up.
* KV budget = gpu_memory_utilization × GPU memory − weights − reserve, in blocks of 16 tokens;
  sequences at once = KV tokens // max_model_len (rounded up to whole blocks).

Training (DeepSpeed ZeRO stage s, N workers with one GPU each, P parameters, b = 2 bytes in
bf16 and 4 in fp32):

* parameters b·P (÷N at stage 3, 0 with offload_params); at stage 3 a gathered working set of
  b × max(2 layers, the embedding matrix) (the layer in use and the one being prefetched).
* gradients b·P (÷N at stage ≥ 2).
* optimizer states: AdamW 12 bytes (fp32 master copy + m + v) in bf16, 8 in fp32; SGD (no
  momentum) 4 in bf16 (the master copy), 0 in fp32; ÷N at stage ≥ 1; in host RAM with
  offload_optimizer (with the fp32 gradient partition, 4·P/N).
* activations (with gradient checkpointing, which `auto` turns on with GPUs, each layer's
  input plus one layer's activations): Korthikanti et al. 2022 (arXiv 2205.05198),
  34 × hidden × tokens bytes per layer for 16-bit activations with flash/SDPA attention (their
  5·a·s/h attention-score term is not stored), ×2 in fp32; tokens = micro_batch_size × 2 ×
  max_length, the most a micro-batch can hold in either row layout (padded: two rows of at
  most max_length per pair; shared-prompt: one row of at most 2 × max_length − prompt).
* logits: tokens × vocab × (b + 8): the model's logits plus their fp32 copy and the fp32
  log-softmax that the loss keeps for backward.
* reserve 2 GiB (CUDA context, NCCL, DeepSpeed communication buckets); a plan fits when the
  total is within 95 % of the GPU's memory (the rest is allocator fragmentation headroom).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
KIB = 2**10


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# Models


def count_params(*, hidden_size: int, n_layers: int, n_heads: int, n_kv_heads: int,
                 head_dim: int, intermediate_size: int, vocab_size: int,
                 tie_word_embeddings: bool, qkv_bias: bool = False, mlp_bias: bool = False,
                 attn_out_bias: bool = False) -> int:
    """Parameters of a Llama-style decoder: token embeddings (+ an untied LM head), per layer
    attention q/k/v/o with grouped KV heads, a gated MLP (gate, up, down) and two RMSNorms, and
    the final norm."""
    h = hidden_size
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    attention = h * q + 2 * h * kv + q * h
    if qkv_bias:
        attention += q + 2 * kv
    if attn_out_bias:
        attention += h
    mlp = 3 * h * intermediate_size + (2 * intermediate_size + h if mlp_bias else 0)
    per_layer = attention + mlp + 2 * h
    embeddings = vocab_size * h * (1 if tie_word_embeddings else 2)
    return embeddings + n_layers * per_layer + h


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know about a decoder-only model."""

    name: str
    n_params: int
    n_layers: int
    hidden_size: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    n_heads: int | None = None
    intermediate_size: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus the LM head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def layer_params(self) -> float:
        return (self.n_params - self.embedding_params) / self.n_layers

    @classmethod
    def from_architecture(cls, name: str, *, hidden_size: int, n_layers: int, n_heads: int,
                          n_kv_heads: int, intermediate_size: int, vocab_size: int,
                          head_dim: int | None = None, tie_word_embeddings: bool = False,
                          qkv_bias: bool = False, mlp_bias: bool = False,
                          max_position_embeddings: int | None = None) -> ModelSpec:
        head_dim = head_dim or hidden_size // n_heads
        n_params = count_params(
            hidden_size=hidden_size, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
            head_dim=head_dim, intermediate_size=intermediate_size, vocab_size=vocab_size,
            tie_word_embeddings=tie_word_embeddings, qkv_bias=qkv_bias, mlp_bias=mlp_bias)
        return cls(name=name, n_params=n_params, n_layers=n_layers, hidden_size=hidden_size,
                   n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=vocab_size,
                   n_heads=n_heads, intermediate_size=intermediate_size,
                   tie_word_embeddings=tie_word_embeddings,
                   max_position_embeddings=max_position_embeddings)

    @classmethod
    def from_config_json(cls, path: str | Path, name: str | None = None) -> ModelSpec:
        """Estimate from a Hugging Face ``config.json`` (or the folder holding one).

        Llama-family keys (Llama, Qwen2, Mistral, SmolLM...): ``num_key_value_heads`` defaults
        to ``num_attention_heads``, ``head_dim`` to hidden/heads, ``tie_word_embeddings`` to
        false (Llama's and Qwen2's default); Qwen2 has q/k/v biases. A nested ``text_config``
        (multimodal wrappers) is read instead of the top level. Mixture-of-experts configs are
        refused: their parameter count needs the expert layout.
        """
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        cfg = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg, **cfg["text_config"]}
        for key in ("num_local_experts", "num_experts", "n_routed_experts"):
            if (cfg.get(key) or 0) > 1:
                raise ValueError(f"{p}: mixture-of-experts config ({key}={cfg[key]}) is not "
                                 "supported by the estimate; pass a known spec instead")
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "vocab_size")
        missing = [k for k in required if not isinstance(cfg.get(k), int)]
        if missing:
            raise ValueError(f"{p}: not a Llama-style decoder config (missing {missing})")
        heads = cfg["num_attention_heads"]
        model_type = str(cfg.get("model_type", ""))
        return cls.from_architecture(
            name or p.parent.name or model_type,
            hidden_size=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or None,
            intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)) or model_type == "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            max_position_embeddings=cfg.get("max_position_embeddings"))

    @classmethod
    def get(cls, spec: str) -> ModelSpec:
        """A known spec by name, or a ``config.json`` / model folder path."""
        key = spec.strip().lower()
        key = MODEL_ALIASES.get(key, key)
        if key in KNOWN_MODELS:
            return KNOWN_MODELS[key]
        p = Path(spec)
        if p.is_file() or (p / "config.json").is_file():
            return cls.from_config_json(p)
        raise ValueError(f"unknown model spec {spec!r}: use one of "
                         f"{', '.join(sorted(KNOWN_MODELS))} or a config.json / model folder")

    @classmethod
    def guess(cls, model_name: str) -> ModelSpec | None:
        """The known spec whose name appears in a model path's last component, if any
        (``/mnt/models/Meta-Llama-3.1-70B-Instruct`` -> llama-3.1-70b)."""
        base = Path(model_name).name.lower().replace("_", "-").replace(" ", "-")
        for key in sorted([*KNOWN_MODELS, *MODEL_ALIASES], key=len, reverse=True):
            if key in base:
                return KNOWN_MODELS[MODEL_ALIASES.get(key, key)]
        return None


# Public architecture numbers (the models' config.json on the Hugging Face Hub).
KNOWN_MODELS: dict[str, ModelSpec] = {
    # Llama-3.1-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads × 128, MLP 14336,
    # vocab 128256, untied LM head, 131072 positions -> 8,030,261,248 parameters.
    "llama-3.1-8b": ModelSpec.from_architecture(
        "llama-3.1-8b", hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072),
    # Llama-3.1-70B: hidden 8192, 80 layers, 64 heads, 8 KV heads × 128, MLP 28672,
    # vocab 128256, untied, 131072 positions -> 70,553,706,496 parameters.
    "llama-3.1-70b": ModelSpec.from_architecture(
        "llama-3.1-70b", hidden_size=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
        intermediate_size=28672, vocab_size=128256, max_position_embeddings=131072),
    # Qwen2.5-7B: hidden 3584, 28 layers, 28 heads, 4 KV heads × 128, MLP 18944,
    # vocab 152064, untied, q/k/v biases, 131072 positions -> 7,615,616,512 parameters.
    "qwen2.5-7b": ModelSpec.from_architecture(
        "qwen2.5-7b", hidden_size=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
        intermediate_size=18944, vocab_size=152064, qkv_bias=True,
        max_position_embeddings=131072),
    # SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 KV heads × 64, MLP 1536, vocab 49152,
    # tied embeddings, 8192 positions -> 134,515,008 parameters.
    "smollm2-135m": ModelSpec.from_architecture(
        "smollm2-135m", hidden_size=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192),
    # Gemma-3-270M: hidden 640, 18 layers, 4 heads, 1 KV head × 256, MLP 2048 (gated), vocab
    # 262144, tied embeddings, 32768 positions -> 268,098,176 parameters; the Llama-style count
    # leaves out each layer's q/k norms and its two extra RMSNorms (32,256 in all). Its
    # sliding-window layers hold at most 512 tokens of KV cache; the estimate counts every
    # layer as full attention, an upper bound.
    "gemma3-270m": ModelSpec.from_architecture(
        "gemma3-270m", hidden_size=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
        intermediate_size=2048, vocab_size=262144, tie_word_embeddings=True,
        max_position_embeddings=32768),
}
# Same architecture under another release name.
MODEL_ALIASES = {"llama-3.3-70b": "llama-3.1-70b", "llama-3-8b": "llama-3.1-8b",
                 "llama-3-70b": "llama-3.1-70b"}


# ---------------------------------------------------------------------------------------------
# GPUs


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    bf16_tflops: float | None = None  # dense bf16 tensor-core peak (datasheet), if known

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    @classmethod
    def get(cls, spec: str) -> GpuSpec:
        """A known GPU by name, or ``NAME:GIB`` / a bare number of GiB for another one."""
        key = spec.strip().lower()
        if key in KNOWN_GPUS:
            return KNOWN_GPUS[key]
        name, _, size = key.rpartition(":")
        try:
            return cls(name or f"{size}gib", float(size))
        except ValueError:
            raise ValueError(f"unknown GPU {spec!r}: use one of {', '.join(KNOWN_GPUS)}, "
                             "or NAME:GIB such as rtx6000:48") from None


# Nominal memory sizes, as the product names give them.
KNOWN_GPUS: dict[str, GpuSpec] = {g.name: g for g in (
    GpuSpec("h100-80gb", 80, 989), GpuSpec("h200-141gb", 141, 989),
    GpuSpec("a100-80gb", 80, 312), GpuSpec("a100-40gb", 40, 312), GpuSpec("l40s-48gb", 48, 362),
    GpuSpec("l4-24gb", 24, 121), GpuSpec("a10g-24gb", 24),
)}
# The fraction of bf16 peak a plain transformers forward (the reference stage) is assumed to
# reach, for the plan's time estimate only.
REFERENCE_MFU = 0.3


# ---------------------------------------------------------------------------------------------
# Plans


@dataclass
class Plan:
    """One plan: ``rows`` to print, ``problems`` that make it refuse, ``notes`` that do not,
    and ``numbers`` (the raw values behind the rows)."""

    title: str
    kind: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "kind": self.kind, "ok": self.ok,
                "problems": list(self.problems), "notes": list(self.notes),
                "rows": [list(r) for r in self.rows], "numbers": dict(self.numbers)}


def format_plan(plan: Plan) -> str:
    verdict = "fits" if plan.ok else "REFUSED"
    lines = [f"{plan.title}: {verdict}"]
    width = max((len(k) for k, _ in plan.rows), default=0)
    lines += [f"  {k:<{width}}  {v}" for k, v in plan.rows]
    if plan.problems:
        lines.append("problems:")
        lines += [f"  - {p}" for p in plan.problems]
    if plan.notes:
        lines.append("notes:")
        lines += [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)


# --- generation ------------------------------------------------------------------------------

RESERVE_FIXED = 1.5 * GIB
RESERVE_FRACTION = 0.02
CUDA_GRAPHS = 1.0 * GIB
KV_BLOCK = 16
TP_CHOICES = (1, 2, 4, 8)  # one node; beyond that, pipeline parallelism

QUANT_BYTES = {"fp8": 1.0, "int8": 1.0, "w8a8": 1.0, "awq": 0.5 + 2.5 / 128,
               "gptq": 0.5 + 2.5 / 128, "int4": 0.5 + 2.5 / 128}
DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "half": 2, "float32": 4}


def weight_bytes(model: ModelSpec, dtype: str = "auto", quantization: str | None = None) -> float:
    """All of a model's weights in bytes (see the module docstring for the rules)."""
    if quantization:
        q = QUANT_BYTES[quantization.lower()]
        linear = model.n_params - model.embedding_params
        return linear * q + model.embedding_params * 2
    return model.n_params * DTYPE_BYTES[dtype]


def kv_heads_per_gpu(model: ModelSpec, tp: int) -> int:
    return max(1, model.n_kv_heads // tp)


def kv_bytes_per_token(model: ModelSpec, tp: int = 1, pp: int = 1, kv_bytes: float = 2) -> float:
    """KV-cache bytes one token takes on one GPU of a tp × pp replica."""
    layers = math.ceil(model.n_layers / pp)
    return 2 * layers * kv_heads_per_gpu(model, tp) * model.head_dim * kv_bytes


def _gen_numbers(model: ModelSpec, gpu: GpuSpec, *, tp: int, pp: int, util: float,
                 max_model_len: int, wbytes: float, kv_bytes: float,
                 cuda_graphs: bool) -> dict[str, Any]:
    weights = wbytes / (tp * pp)
    budget = util * gpu.memory_bytes
    reserve = RESERVE_FIXED + RESERVE_FRACTION * gpu.memory_bytes + (
        CUDA_GRAPHS if cuda_graphs else 0.0)
    kv_avail = budget - weights - reserve
    per_token = kv_bytes_per_token(model, tp, pp, kv_bytes)
    blocks = max(0, math.floor(kv_avail / (per_token * KV_BLOCK)))
    tokens = blocks * KV_BLOCK
    seq_tokens = math.ceil(max_model_len / KV_BLOCK) * KV_BLOCK
    return {"weights_bytes_per_gpu": weights, "budget_bytes_per_gpu": budget,
            "reserve_bytes_per_gpu": reserve, "kv_bytes_per_gpu": max(kv_avail, 0.0),
            "kv_bytes_per_token_per_gpu": per_token, "kv_bytes_per_token_replica": per_token * tp,
            "kv_tokens_per_replica": tokens, "max_concurrent_seqs": tokens // seq_tokens,
            "weights_fit": weights + reserve <= budget}


def _tp_valid(model: ModelSpec, tp: int) -> bool:
    heads_ok = model.n_heads is None or model.n_heads % tp == 0
    return heads_ok and (model.n_kv_heads % tp == 0 or tp % model.n_kv_heads == 0)


def plan_generation(cfg: Any, model: ModelSpec, gpu: GpuSpec) -> Plan:
    """Per-replica GPU memory of the teacher's vLLM engine for a :class:`RunConfig`."""
    t = cfg.teacher
    v = t.vllm
    tp = int(v.tensor_parallel_size)
    pp = int(getattr(v, "pipeline_parallel_size", 1) or 1)
    quant = getattr(v, "quantization", None)
    if quant is not None and quant.lower() not in QUANT_BYTES:
        quant = None
    kv_dtype = str(getattr(v, "kv_cache_dtype", "auto") or "auto")
    dtype = t.dtype if t.dtype in DTYPE_BYTES else "auto"
    wbytes = weight_bytes(model, dtype, quant)
    kv_bytes = 1.0 if kv_dtype.startswith("fp8") else float(DTYPE_BYTES[dtype])
    cuda_graphs = not v.enforce_eager
    per_replica = tp * pp
    common = {"pp": pp, "util": v.gpu_memory_utilization, "max_model_len": v.max_model_len,
              "kv_bytes": kv_bytes, "cuda_graphs": cuda_graphs}
    n = _gen_numbers(model, gpu, tp=tp, wbytes=wbytes, **common)
    n.update(tensor_parallel_size=tp, pipeline_parallel_size=pp, gpus_per_replica=per_replica,
             replicas=t.replicas, total_gpus=per_replica * t.replicas,
             weights_bytes_total=wbytes, max_model_len=v.max_model_len,
             max_num_seqs=v.max_num_seqs)
    precision = quant or ("bfloat16" if dtype == "auto" else dtype)
    plan = Plan(title=f"Generation plan: teacher {model.name} on {gpu.name} "
                      f"({gpu.memory_gib:g} GiB per GPU)", kind="generation", numbers=n)
    kv_heads = kv_heads_per_gpu(model, tp)
    plan.rows = [
        ("teacher model", f"{model.name}: {model.n_params / 1e9:.2f} B parameters, "
                          f"{model.n_layers} layers, {model.n_kv_heads} KV heads x "
                          f"{model.head_dim}"),
        ("GPUs per replica", f"{per_replica} (tensor_parallel_size {tp} x "
                             f"pipeline_parallel_size {pp})"),
        ("replicas / GPUs in all", f"{t.replicas} / {per_replica * t.replicas}"),
        ("weights", f"{gib(wbytes)} in {precision} "
                    f"({wbytes / model.n_params:.2f} bytes/param)"),
        ("weights per GPU", f"{gib(n['weights_bytes_per_gpu'])} (/ {per_replica} GPUs)"),
        ("vLLM budget per GPU", f"{gib(n['budget_bytes_per_gpu'])} "
                                f"(gpu_memory_utilization {v.gpu_memory_utilization:g} x "
                                f"{gpu.memory_gib:g} GiB)"),
        ("reserve per GPU", f"{gib(n['reserve_bytes_per_gpu'])} (1.5 GiB + 2% of the GPU"
                            + (" + 1 GiB CUDA graphs" if cuda_graphs else "") + ")"),
        ("KV cache per GPU", f"{gib(n['kv_bytes_per_gpu'])} (budget - weights - reserve)"),
        ("KV bytes per token", f"{n['kv_bytes_per_token_per_gpu'] / KIB:g} KiB per GPU = 2 x "
                               f"{math.ceil(model.n_layers / pp)} layers x {kv_heads} KV "
                               f"head(s) x {model.head_dim} x {kv_bytes:g} B; "
                               f"{n['kv_bytes_per_token_replica'] / KIB:g} KiB per replica"),
        ("KV cache tokens per replica", f"{n['kv_tokens_per_replica']:,}"),
        (f"sequences of {v.max_model_len} tokens at once",
         f"{n['max_concurrent_seqs']} per replica (max_num_seqs {v.max_num_seqs})"),
    ]
    if not _tp_valid(model, tp):
        plan.problems.append(
            f"tensor_parallel_size {tp} must divide the {model.n_heads} attention heads and "
            f"divide or be a multiple of the {model.n_kv_heads} KV heads; use one of "
            f"{', '.join(str(x) for x in TP_CHOICES if _tp_valid(model, x))}")
    if model.max_position_embeddings and v.max_model_len > model.max_position_embeddings:
        plan.problems.append(
            f"teacher.vllm.max_model_len {v.max_model_len} exceeds the model's "
            f"{model.max_position_embeddings} positions; lower max_model_len")
    if not n["weights_fit"] or n["max_concurrent_seqs"] < 1:
        plan.problems.append(_gen_refusal(model, gpu, cfg, n, wbytes, common, quant))
    elif n["max_concurrent_seqs"] < v.max_num_seqs:
        plan.notes.append(
            f"at most {n['max_concurrent_seqs']} sequences of the full max_model_len fit in the "
            f"KV cache, fewer than max_num_seqs={v.max_num_seqs}: vLLM then runs fewer at once "
            "or preempts (fine when most sequences are shorter)")
    if t.engine == "openai":
        pass  # the server's GPUs, not the actors': see the note below
    elif t.num_gpus == 0:
        plan.notes.append(f"teacher.num_gpus is 0 (a CPU config): the plan shows what it would "
                          f"need with teacher.num_gpus={per_replica} on {gpu.name}")
    elif t.num_gpus < 1 and per_replica == 1:
        if v.gpu_memory_utilization > t.num_gpus:
            plan.problems.append(
                f"teacher.num_gpus {t.num_gpus:g} shares a GPU between engines, but each claims "
                f"gpu_memory_utilization {v.gpu_memory_utilization:g} of the whole GPU: set "
                f"teacher.vllm.gpu_memory_utilization <= {t.num_gpus:g}")
    elif t.num_gpus < per_replica:
        plan.problems.append(f"teacher.num_gpus {t.num_gpus:g} is less than the "
                             f"{per_replica} GPUs a replica uses: set teacher.num_gpus="
                             f"{per_replica}")
    elif t.num_gpus > per_replica:
        plan.notes.append(f"teacher.num_gpus {t.num_gpus:g} reserves more GPUs than the "
                          f"{per_replica} the engine uses")
    if t.engine == "openai":
        plan.notes.append("teacher.engine is openai: the teacher runs on its own server; the plan "
                          "shows what a vLLM server with these settings would need")
    elif t.engine == "transformers":
        plan.notes.append("teacher.engine is transformers: planned as vLLM (the transformers "
                          "engine holds the weights but no pre-allocated KV cache)")
    return plan


def _gen_refusal(model: ModelSpec, gpu: GpuSpec, cfg: Any, n: dict[str, Any], wbytes: float,
                 common: dict[str, Any], quant: str | None) -> str:
    v = cfg.teacher.vllm
    tp = v.tensor_parallel_size
    if not n["weights_fit"]:
        why = (f"the weights alone ({gib(n['weights_bytes_per_gpu'])} per GPU) plus the "
               f"{gib(n['reserve_bytes_per_gpu'])} reserve exceed the "
               f"{gib(n['budget_bytes_per_gpu'])} budget per GPU")
    else:
        why = (f"fewer than one sequence of max_model_len={v.max_model_len} fits in the "
               f"{gib(n['kv_bytes_per_gpu'])} left for the KV cache per GPU "
               f"({n['kv_tokens_per_replica']:,} tokens)")
    fixes = []

    def fits(numbers: dict[str, Any], seqs: int = 1) -> bool:
        return numbers["weights_fit"] and numbers["max_concurrent_seqs"] >= seqs

    options = [x for x in TP_CHOICES if x > tp and _tp_valid(model, x)]
    at = {x: _gen_numbers(model, gpu, tp=x, wbytes=wbytes, **common) for x in options}
    first = next((x for x in options if fits(at[x])), None)
    if first is not None:
        roomy = next((x for x in options if fits(at[x], v.max_num_seqs)), None)
        extra = ""
        if roomy != first:
            extra = (f": {at[first]['max_concurrent_seqs']} sequence(s) of {v.max_model_len} "
                     "tokens fit there")
            if roomy is not None:
                extra += f", {roomy} holds max_num_seqs={v.max_num_seqs} of them"
        fixes.append(f"raise teacher.vllm.tensor_parallel_size to at least {first} and "
                     f"teacher.num_gpus to match{extra}")
    elif options:
        fixes.append(f"tensor_parallel_size up to {max(options)} is not enough on one node: add "
                     "pipeline_parallel_size across nodes")
    if n["weights_fit"]:
        per_seq = n["kv_bytes_per_token_per_gpu"]
        longest = int(n["kv_bytes_per_gpu"] // per_seq) // KV_BLOCK * KV_BLOCK
        if longest >= 128:
            fixes.append(f"lower teacher.vllm.max_model_len to at most {longest}")
    if quant is None:
        fp8 = weight_bytes(model, quantization="fp8")
        if fits(_gen_numbers(model, gpu, tp=tp, wbytes=fp8, **common)):
            fixes.append(f"use fp8 weights (a quantized checkpoint: {gib(fp8 / tp)} per GPU "
                         f"at tensor_parallel_size {tp})")
    bigger = next((g for g in sorted(KNOWN_GPUS.values(), key=lambda g: g.memory_gib)
                   if g.memory_gib > gpu.memory_gib
                   and fits(_gen_numbers(model, g, tp=tp, wbytes=wbytes, **common))), None)
    if bigger is not None:
        fixes.append(f"more GPU memory (fits on {bigger.name} at tensor_parallel_size {tp})")
    if v.gpu_memory_utilization < 0.95 and fits(
            _gen_numbers(model, gpu, tp=tp, wbytes=wbytes, **{**common, "util": 0.95})):
        fixes.append("raise teacher.vllm.gpu_memory_utilization to 0.95")
    return f"tensor_parallel_size={tp}: {why}. Change: " + "; or ".join(fixes or [
        "a smaller model"])


# --- training --------------------------------------------------------------------------------

TRAIN_RESERVE = 2.0 * GIB
TRAIN_USABLE = 0.95
ACT_BYTES_PER_HIDDEN_TOKEN_LAYER = 34  # Korthikanti et al. 2022, 16-bit, no recomputation


def _train_numbers(model: ModelSpec, gpu: GpuSpec, *, stage: int, workers: int, b: int,
                   optimizer: str, offload_optimizer: bool, offload_params: bool,
                   micro_batch_size: int, max_length: int, logprob_chunk: int | None = None,
                   checkpointing: bool = False) -> dict[str, Any]:
    P = model.n_params
    n = workers
    params = b * P / (n if stage == 3 else 1)
    if offload_params and stage == 3:
        params = 0.0
    working = b * max(2 * model.layer_params, model.vocab_size * model.hidden_size) \
        if stage == 3 else 0.0
    grads = b * P / (n if stage >= 2 else 1)
    mixed = b == 2
    opt_per_param = (8 if optimizer == "adamw" else 0) + (4 if mixed else 0)
    optim = opt_per_param * P / (n if stage >= 1 else 1)
    optim_gpu = 0.0 if offload_optimizer else optim
    tokens = micro_batch_size * 2 * max_length
    per_layer = ACT_BYTES_PER_HIDDEN_TOKEN_LAYER * model.hidden_size * tokens * b / 2
    # checkpointing keeps each layer's input (hidden x tokens x b) and one layer's activations
    acts = model.hidden_size * tokens * b * model.n_layers + per_layer if checkpointing else \
        per_layer * model.n_layers
    # full: the batch's logits (b bytes) plus fp32 log-softmax and its gradient (8 bytes);
    # chunked: one slice of logprob_chunk response tokens at a time (ecd_ray.train.collate)
    logits = min(tokens, logprob_chunk or tokens) * model.vocab_size * (b + 8)
    total = params + working + grads + optim_gpu + acts + logits + TRAIN_RESERVE
    usable = TRAIN_USABLE * gpu.memory_bytes
    host = (optim + 4 * P / (n if stage >= 1 else 1) if offload_optimizer else 0.0) + (
        b * P / n if offload_params and stage == 3 else 0.0)
    return {"params_bytes": params, "gathered_bytes": working, "grads_bytes": grads,
            "optimizer_bytes": optim, "optimizer_gpu_bytes": optim_gpu, "tokens": tokens,
            "activations_bytes": acts, "logits_bytes": logits, "reserve_bytes": TRAIN_RESERVE,
            "total_bytes_per_gpu": total, "usable_bytes_per_gpu": usable,
            "host_bytes_per_worker": host, "fits": total <= usable}


def plan_training(cfg: Any, model: ModelSpec, gpu: GpuSpec) -> Plan:
    """Per-GPU memory of DPO training for a :class:`TrainConfig`."""
    stage = 0 if cfg.strategy == "ddp" else int(cfg.zero_stage)
    if cfg.dtype == "auto":
        b = 2 if cfg.use_gpu else 4
    else:
        b = 2 if cfg.dtype == "bfloat16" else 4
    args = {"stage": stage, "workers": cfg.num_workers, "b": b, "optimizer": cfg.optimizer,
            "offload_optimizer": cfg.offload_optimizer, "offload_params": cfg.offload_params,
            "micro_batch_size": cfg.micro_batch_size, "max_length": cfg.max_length,
            "logprob_chunk": cfg.logprob_chunk if cfg.logprobs == "chunked" else None,
            "checkpointing": cfg.gradient_checkpointing == "on" or (
                cfg.gradient_checkpointing == "auto" and cfg.use_gpu)}
    n = _train_numbers(model, gpu, **args)
    n.update(zero_stage=stage, num_workers=cfg.num_workers, bytes_per_param=b)
    P, w = model.n_params, cfg.num_workers
    plan = Plan(title=f"Training plan: policy {model.name} on {w} x {gpu.name} "
                      f"({gpu.memory_gib:g} GiB per GPU)", kind="training", numbers=n)
    shard = {0: "", 1: "optimizer", 2: "optimizer + gradients", 3: "all"}[stage]
    opt_rule = ("fp32 master + m + v = 12" if b == 2 else "m + v = 8") if \
        cfg.optimizer == "adamw" else ("fp32 master = 4" if b == 2 else "none = 0")
    plan.rows = [
        ("policy model", f"{model.name}: {P / 1e9:.2f} B parameters, {model.n_layers} layers, "
                         f"hidden {model.hidden_size}, vocab {model.vocab_size}"),
        ("sharding", f"ZeRO stage {stage} over {w} GPU(s)"
                     + (f" ({shard} states split)" if shard else " (nothing split)")
                     + (" [strategy ddp]" if cfg.strategy == "ddp" else "")),
        ("precision", f"{'bfloat16' if b == 2 else 'float32'} ({b} bytes/param)"),
        ("parameters per GPU", gib(n["params_bytes"])
         + (" (offloaded to host)" if cfg.offload_params and stage == 3 else "")),
        ("ZeRO-3 gathered working set", gib(n["gathered_bytes"])),
        ("gradients per GPU", gib(n["grads_bytes"])),
        ("optimizer states per GPU", f"{gib(n['optimizer_gpu_bytes'])} ({cfg.optimizer}: "
                                     f"{opt_rule} bytes/param"
                                     + (f"; {gib(n['optimizer_bytes'])} offloaded to host)"
                                        if cfg.offload_optimizer else ")")),
        ("tokens per micro-batch", f"{n['tokens']:,} = {cfg.micro_batch_size} pair(s) x 2 x "
                                   f"{cfg.max_length}"),
        ("activations" + (" (gradient checkpointing)" if args["checkpointing"] else
                          " (no checkpointing)"),
         f"{gib(n['activations_bytes'])} = " + (
             f"{model.hidden_size} x tokens x {b} B x {model.n_layers} layer inputs + one layer"
             f"'s 34 x {model.hidden_size} x tokens x {b / 2:g}" if args["checkpointing"] else
             f"34 x {model.hidden_size} x tokens x {model.n_layers} layers x {b / 2:g}")),
        ("logits + fp32 log-softmax", f"{gib(n['logits_bytes'])} = " + (
            f"{args['logprob_chunk']:,} tokens (logprobs=chunked)" if args["logprob_chunk"]
            else "tokens (logprobs=full)") + f" x {model.vocab_size} x {b + 8} B"),
        ("reserve", gib(TRAIN_RESERVE)),
        ("total per GPU", f"{gib(n['total_bytes_per_gpu'])} of "
                          f"{gib(n['usable_bytes_per_gpu'])} usable (95%)"),
    ]
    if n["host_bytes_per_worker"]:
        plan.rows.append(("host RAM per worker (offload)", gib(n["host_bytes_per_worker"])))
    _reference_rows(plan, cfg, model, gpu, b)
    if cfg.offload_params and stage != 3:
        plan.problems.append("offload_params needs zero_stage=3")
    if not cfg.use_gpu:
        plan.notes.append("use_gpu is false (a CPU config): the plan shows what the workers "
                          f"would need on {gpu.name}")
    if not n["fits"]:
        plan.problems.append(_train_refusal(model, gpu, cfg, n, args))
    return plan


def _reference_rows(plan: Plan, cfg: Any, model: ModelSpec, gpu: GpuSpec, b: int) -> None:
    """The reference model's memory (and, precomputed, the stage's layout and time)."""
    from ecd_ray.train.collate import DEFAULT_LOGPROB_CHUNK
    from ecd_ray.train.reference import REFERENCE_BATCH, reference_layout

    P = model.n_params
    if cfg.reference == "resident":
        where = "per GPU" if cfg.use_gpu else "host RAM per worker"
        plan.rows.append((f"reference model ({where})",
                          f"{gib(b * P)} (resident, in the policy's precision)"))
        plan.numbers["reference_bytes"] = b * P
        return
    try:
        layout = reference_layout(cfg)
    except ValueError as exc:
        plan.problems.append(str(exc))
        return
    tokens = REFERENCE_BATCH * 2 * cfg.max_length
    # inference: weights, one layer's activations at a time, one chunk of fp32 logits
    work = 4 * model.hidden_size * tokens * b + \
        min(tokens, DEFAULT_LOGPROB_CHUNK) * model.vocab_size * 4 * 2
    per = b * P / max(1, layout.gpus) + work + TRAIN_RESERVE
    where = f"{layout.gpus} x {gpu.name}" if layout.gpus else f"{layout.cpus:g} CPUs"
    plan.rows.append(("reference stage (precomputed)",
                      f"{layout.replicas} actor(s) x {where}, {layout.dtype}, the workers' "
                      "resource shape"))
    plan.rows.append((f"reference memory per {'GPU' if layout.gpus else 'actor (host RAM)'}",
                      f"{gib(per)} = weights {gib(b * P / max(1, layout.gpus))} + "
                      f"{REFERENCE_BATCH} pairs x 2 x {cfg.max_length} tokens of activations "
                      "and one logits chunk + reserve"))
    plan.numbers.update(reference_replicas=layout.replicas, reference_gpus=layout.gpus,
                        reference_bytes_per_device=per)
    if layout.gpus and gpu.bf16_tflops:
        flops = 2 * P * 2 * cfg.max_length  # per pair, every sequence at max_length
        secs = 1000 * flops / (layout.replicas * REFERENCE_MFU * gpu.bf16_tflops * 1e12)
        plan.rows.append(("reference time", f"<= {secs:.0f} s per 1,000 pairs ({layout.replicas}"
                                            f" actor(s) at {REFERENCE_MFU:.0%} of "
                                            f"{gpu.bf16_tflops:g} bf16 TFLOPS; sequences at "
                                            "max_length, an upper bound)"))
        plan.numbers["reference_s_per_1k_pairs"] = secs
    elif not layout.gpus:
        plan.notes.append("reference on CPU: time not estimated (measure it: benchmarks/"
                          "bench_train.py)")
    if layout.gpus and per > TRAIN_USABLE * gpu.memory_bytes:
        need = next((g for g in _powers_of_two(layout.gpus * 2, cfg.num_workers + 1)
                     if b * P / g + work + TRAIN_RESERVE <= TRAIN_USABLE * gpu.memory_bytes),
                    None)
        plan.problems.append(
            f"the reference model needs {gib(per)} per GPU, more than the "
            f"{gib(TRAIN_USABLE * gpu.memory_bytes)} usable on {gpu.name}: "
            + (f"set reference_gpus={need}" if need else "use reference=resident with ZeRO-3 "
               "or larger GPUs"))


def _train_refusal(model: ModelSpec, gpu: GpuSpec, cfg: Any, n: dict[str, Any],
                   args: dict[str, Any]) -> str:
    stage, w = args["stage"], args["workers"]
    fixes = []

    def fits(**changes: Any) -> bool:
        return bool(_train_numbers(model, gpu, **{**args, **changes})["fits"])

    if stage < 3 and fits(stage=3):
        fixes.append(f"set zero_stage=3 (and strategy=deepspeed) with the same {w} workers")
    elif not fits(stage=3):
        need = next((k for k in _powers_of_two(w + 1, 4096)
                     if fits(stage=3, workers=k)), None)
        if need is not None:
            fixes.append(f"zero_stage=3 with num_workers>={need}")
    if not args["offload_optimizer"]:
        for s in sorted({max(stage, 1), 3}):
            if fits(stage=s, offload_optimizer=True):
                fixes.append(f"offload_optimizer=true with zero_stage={s} on the same {w} "
                             "worker(s)")
                break
    if not fits(stage=3, offload_optimizer=True, offload_params=True, workers=max(w, 4096)):
        fixes.append("a GPU with more memory: activations and logits alone do not fit")
    mb, length = args["micro_batch_size"], args["max_length"]
    if mb > 1 and fits(micro_batch_size=1):
        fixes.append(f"micro_batch_size=1 (raise grad_accum by x{mb} to keep the batch)")
    for shorter in (length // 2, length // 4):
        if shorter > cfg.max_prompt_tokens and fits(micro_batch_size=1, max_length=shorter):
            fixes.append(f"micro_batch_size=1 and max_length={shorter}")
            break
    return (f"needs {gib(n['total_bytes_per_gpu'])} per GPU, more than the "
            f"{gib(n['usable_bytes_per_gpu'])} usable on {gpu.name} (ZeRO stage {stage}, "
            f"{w} worker(s)). Change: " + "; or ".join(
                fixes or ["more workers with zero_stage=3 and offload_optimizer=true, or a "
                          "smaller micro_batch_size/max_length"]))


def _powers_of_two(start: int, stop: int) -> Iterable[int]:
    k = 1
    while k <= stop:
        if k >= start:
            yield k
        k *= 2


# ---------------------------------------------------------------------------------------------
# Command line: `ecd-ray plan`


def _merged_tree(path: Path | None, overrides: list[str]) -> dict[str, Any]:
    import yaml

    from ecd_ray.config import deep_merge, parse_overrides

    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        data = loaded if isinstance(loaded, dict) else {}
    tree, _ = parse_overrides(list(overrides))
    return deep_merge(data, tree)


def _load_for_plan(kind: str, path: Path | None, overrides: list[str]) -> tuple[Any, list[str]]:
    """The config, and the problems that only concern files (missing model folders, seeds,
    pairs): a plan does not need them, so it goes on and lists them as notes. Raises
    ConfigError for anything else."""
    import yaml
    from pydantic import ValidationError

    from ecd_ray.config import ConfigError, RunConfig, TrainConfig, load_config, load_train_config

    loader, model = ((load_config, RunConfig) if kind == "generation"
                     else (load_train_config, TrainConfig))
    try:
        return loader(path, overrides), []
    except ConfigError as exc:
        try:
            cfg = model.model_validate(_merged_tree(path, overrides))
        except (ValidationError, OSError, ValueError, yaml.YAMLError):  # the loader's error
            raise exc from None
        return cfg, [f"not checked for this plan: {p}" for p in exc.problems]


def _looks_like_train(path: Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(data, dict):
        return False
    return isinstance(data.get("pairs"), str) or bool(
        {"zero_stage", "num_workers", "micro_batch_size", "loss", "strategy"} & set(data))


def _model_spec(spec: str | None, model_field: str, flag: str) -> ModelSpec:
    from ecd_ray.config import EMBEDDED_MODEL, GEMMA_MODEL

    if spec:
        return ModelSpec.get(spec)
    embedded = {EMBEDDED_MODEL: "smollm2-135m", GEMMA_MODEL: "gemma3-270m"}
    if model_field in embedded:
        return KNOWN_MODELS[embedded[model_field]]
    if (Path(model_field) / "config.json").is_file():
        return ModelSpec.from_config_json(model_field)
    guessed = ModelSpec.guess(model_field)
    if guessed is not None:
        return guessed
    raise ValueError(f"cannot tell the architecture of {model_field!r} (no config.json there): "
                     f"pass {flag} (one of {', '.join(sorted(KNOWN_MODELS))}, or a config.json)")


def main_plan(config_path: Path | None, overrides: list[str], gpu: str = "h100-80gb",
              teacher_spec: str | None = None, student_spec: str | None = None,
              train_config: Path | None = None) -> int:
    """``ecd-ray plan``: print the generation plan of ``config_path`` and/or the training plan
    of ``train_config`` (a training YAML given as ``config_path`` is recognised too). Overrides
    starting with ``train.`` go to the training config. Returns 0 when every plan fits, 1 when
    one is refused, 2 for an unusable config, GPU or model spec."""
    from ecd_ray.config import ConfigError

    gen_over = [o for o in overrides if not o.startswith("train.")]
    train_over = [o[len("train."):] for o in overrides if o.startswith("train.")]
    gen_path = config_path
    if config_path is not None and train_config is None and _looks_like_train(config_path):
        gen_path, train_config, train_over = None, config_path, train_over + gen_over
    plans: list[Plan] = []
    try:
        g = GpuSpec.get(gpu)
        if gen_path is not None:
            cfg, notes = _load_for_plan("generation", gen_path, gen_over)
            spec = _model_spec(teacher_spec, cfg.teacher.model, "--teacher-spec")
            plan = plan_generation(cfg, spec, g)
            plan.notes += notes
            plans.append(plan)
        if train_config is not None:
            tcfg, notes = _load_for_plan("training", train_config, train_over)
            spec = _model_spec(student_spec, tcfg.model, "--student-spec")
            plan = plan_training(tcfg, spec, g)
            plan.notes += notes
            plans.append(plan)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not plans:
        print("error: give --config (generation or training YAML) and/or --train-config",
              file=sys.stderr)
        return 2
    print("\n\n".join(format_plan(p) for p in plans))
    return 0 if all(p.ok for p in plans) else 1


__all__ = ["KNOWN_GPUS", "KNOWN_MODELS", "GpuSpec", "ModelSpec", "Plan", "count_params",
           "format_plan", "kv_bytes_per_token", "main_plan", "plan_generation", "plan_training",
           "weight_bytes"]
