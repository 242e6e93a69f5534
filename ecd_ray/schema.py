"""The Arrow schemas of every table the pipeline reads or writes, in one place.

* ``SEEDS``: validated seed rows, the input of the generation stage.
* ``EVOLUTIONS``: one row per seed: its chain of levels (instruction, added requirement,
  answer, token counts) and why the chain stopped.
* ``PAIRS``: the conversational preference format (``prompt``, ``chosen``, ``rejected`` as
  lists of ``{role, content}``) that TRL and ``datasets`` read directly, plus lineage columns.
* ``REJECTS``: everything set aside, with the stage and a machine-readable reason.
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
CONVERSATION = pa.list_(MESSAGE)

REQUIREMENT = pa.struct(
    [
        ("id", pa.string()),
        ("kwargs_json", pa.string()),  # JSON object: the checker's keyword arguments
        ("level", pa.int32()),  # the level that added it
        ("text", pa.string()),  # how it was phrased in the instruction
    ]
)

SEEDS = pa.schema(
    [
        ("seed_id", pa.string()),
        ("source", pa.string()),  # file:line (or file:row) the seed came from
        ("instruction", pa.string()),
        ("response", pa.string()),  # null unless the seed file supplies R0
    ]
)

# One APC responder's answer to a level's instruction.
RESPONSE = pa.struct(
    [
        ("responder", pa.string()),  # apc.responders[].name
        ("rank", pa.int32()),  # higher = stronger
        ("model", pa.string()),
        ("response", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),  # "stop" or "length"
    ]
)

# An LLM judge's verdict on one APC pair of a level (apc.filter with a judge).
JUDGEMENT = pa.struct(
    [
        ("chosen", pa.string()),  # the stronger responder's name
        ("rejected", pa.string()),  # the weaker responder's name
        ("verdict", pa.string()),  # "chosen", "rejected" (judge prefers the weaker), "unclear"
        ("raw", pa.string()),  # the judge's reply, truncated
    ]
)

LEVEL = pa.struct(
    [
        ("level", pa.int32()),
        ("instruction", pa.string()),
        ("operation", pa.string()),  # "seed" for level 0
        ("added_text", pa.string()),  # what the evolution step added (template mode)
        ("requirements", pa.list_(REQUIREMENT)),  # all requirements in force at this level
        ("response", pa.string()),
        ("response_source", pa.string()),  # "teacher" or "seed"
        ("model", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),  # "stop", "length", or "seed"
        # the verify stage: this level's answer against each of its requirements, in order
        ("passes", pa.list_(pa.bool_())),
        ("passes_loose", pa.list_(pa.bool_())),
        # APC: whether this level's prompt gives APC pairs (strategy apc/mixed), and the
        # responders' answers (the teacher's own, when a responder is from_teacher, is
        # `response` above and is not repeated here)
        ("apc", pa.bool_()),
        ("responses", pa.list_(RESPONSE)),
        ("judgements", pa.list_(JUDGEMENT)),
    ]
)

EVOLVE_ATTEMPT = pa.struct(
    [
        ("level", pa.int32()),
        ("operation", pa.string()),
        ("candidate", pa.string()),
        ("reason", pa.string()),
    ]
)

EVOLUTIONS = pa.schema(
    [
        ("seed_id", pa.string()),
        ("source", pa.string()),
        ("levels", pa.list_(LEVEL)),
        ("num_levels", pa.int32()),
        # "completed", or "<stage>:<reason>" for the step that ended the chain early
        ("stop_reason", pa.string()),
        ("rejected_attempts", pa.list_(EVOLVE_ATTEMPT)),
        ("sampling_json", pa.string()),  # sampling settings of answers and evolutions
        ("worker", pa.string()),  # "<ray node id>:<pid>" of the actor that ran the chain
    ]
)

PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("prompt", CONVERSATION),
        ("chosen", CONVERSATION),
        ("rejected", CONVERSATION),
        ("seed_id", pa.string()),
        # "ecd": chosen = Rk, rejected = R(k-j) (same teacher); "apc": chosen and rejected
        # answer the same prompt, from responders of different rank (stronger = chosen)
        ("strategy", pa.string()),
        ("chosen_level", pa.int32()),  # apc: the level of the prompt, both sides
        ("rejected_level", pa.int32()),
        ("chosen_rank", pa.int32()),  # apc: the responders' ranks (higher = stronger); ecd: null
        ("rejected_rank", pa.int32()),
        ("operation", pa.string()),  # the operation that produced the chosen level
        ("requirements", pa.list_(REQUIREMENT)),  # requirements of the chosen level
        ("chosen_model", pa.string()),
        ("rejected_model", pa.string()),
        ("chosen_finish_reason", pa.string()),
        ("rejected_finish_reason", pa.string()),
        # verification against the chosen level's requirements (aligned with `requirements`)
        ("chosen_passes", pa.list_(pa.bool_())),
        ("rejected_passes", pa.list_(pa.bool_())),
        ("chosen_missed", pa.int32()),
        ("rejected_missed", pa.int32()),
        ("hard_negative_verified", pa.bool_()),
        # the rejected side was cut at its token limit: a weaker contrast than a finished answer
        ("rejected_truncated", pa.bool_()),
        # curriculum (ecd_ray.curriculum): 0 = easiest .. 1 = hardest, and its stage (0 first)
        ("difficulty", pa.float32()),
        ("stage", pa.int32()),
        ("split", pa.string()),  # "train", or "heldout" for evaluation seeds
    ]
)

REJECTS = pa.schema(
    [
        ("stage", pa.string()),  # "seed", "evolve", "answer" or "pair"
        ("reason", pa.string()),  # machine-readable code, e.g. "invalid_json"
        ("detail", pa.string()),  # a human-readable sentence
        ("seed_id", pa.string()),
        ("source", pa.string()),
        ("level", pa.int32()),
        ("raw", pa.string()),  # the offending text, truncated
    ]
)

RAW_PREVIEW_CHARS = 500


def missing_columns(table: pa.Table, needed: pa.Schema, stage: str) -> None:
    """Raise a ``KeyError`` naming the columns a stage needs but its input lacks."""
    missing = [name for name in needed.names if name not in table.column_names]
    if missing:
        raise KeyError(
            f"stage '{stage}' needs column(s) {missing}; its input has {table.column_names}"
        )


def reject(
    stage: str,
    reason: str,
    detail: str,
    *,
    seed_id: str | None = None,
    source: str | None = None,
    level: int | None = None,
    raw: str | None = None,
) -> dict[str, object]:
    """A row of ``REJECTS``; ``raw`` is truncated so a 100k-character input stays small."""
    if raw is not None and len(raw) > RAW_PREVIEW_CHARS:
        raw = raw[:RAW_PREVIEW_CHARS] + f"... [{len(raw)} chars]"
    return {
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "seed_id": seed_id,
        "source": source,
        "level": level,
        "raw": raw,
    }
