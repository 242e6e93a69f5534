"""Instruction-following evaluation in the IFEval format (Zhou et al. 2023, arXiv 2311.07911).

Prompts are JSONL rows ``{"key", "prompt", "instruction_id_list", "kwargs"}`` (``kwargs`` is a
list aligned with ``instruction_id_list``; null values are ignored). Responses are JSONL rows
``{"key" or "prompt", "response"}``. Scores are prompt-level (every instruction followed) and
instruction-level accuracy, strict and loose, overall and per instruction type.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecd_ray.constraints import CATALOGUE, check_loose, check_strict


@dataclass(frozen=True)
class EvalPrompt:
    key: str
    prompt: str
    instruction_ids: list[str]
    kwargs: list[dict[str, Any]]


def read_prompts(path: Path) -> list[EvalPrompt]:
    """Read IFEval-format prompts; a malformed row or an unknown instruction id is an error
    naming the line (evaluating a different set than the user asked for would mislead)."""
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ids = list(row["instruction_id_list"])
            kwargs = [{k: v for k, v in (kw or {}).items() if v is not None}
                      for kw in row.get("kwargs") or [{}] * len(ids)]
            prompt = EvalPrompt(str(row.get("key", lineno)), row["prompt"], ids, kwargs)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: not an IFEval prompt row ({exc!r})") from None
        unknown = [i for i in ids if i not in CATALOGUE]
        if unknown or len(kwargs) != len(ids):
            raise ValueError(f"{path}:{lineno}: unknown instruction ids {unknown} or kwargs "
                             f"not aligned with instruction_id_list")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def read_responses(path: Path, prompts: list[EvalPrompt]) -> list[str]:
    """Responses aligned with ``prompts``, matched by ``key`` or else by ``prompt`` text."""
    by_key: dict[str, str] = {}
    by_prompt: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if "key" in row:
                by_key[str(row["key"])] = row["response"]
            if "prompt" in row:
                by_prompt[row["prompt"]] = row["response"]
    out, missing = [], []
    for p in prompts:
        response = by_key.get(p.key, by_prompt.get(p.prompt))
        if response is None:
            missing.append(p.key)
        out.append(response or "")
    if missing:
        raise ValueError(f"{path}: no response for {len(missing)} prompt(s), e.g. {missing[:5]}")
    return out


def score(prompts: list[EvalPrompt], responses: list[str]) -> dict[str, Any]:
    """Prompt- and instruction-level accuracy, strict and loose, overall and per type."""
    per_prompt = []
    per_type: dict[str, dict[str, int]] = defaultdict(lambda: {"n": 0, "strict": 0, "loose": 0})
    for p, response in zip(prompts, responses, strict=True):
        strict = [check_strict(i, response, kw) for i, kw in zip(p.instruction_ids, p.kwargs,
                                                                 strict=True)]
        loose = [check_loose(i, response, kw) for i, kw in zip(p.instruction_ids, p.kwargs,
                                                               strict=True)]
        for rid, s, lo in zip(p.instruction_ids, strict, loose, strict=True):
            per_type[rid]["n"] += 1
            per_type[rid]["strict"] += s
            per_type[rid]["loose"] += lo
        per_prompt.append({"key": p.key, "instruction_ids": p.instruction_ids,
                           "strict": strict, "loose": loose, "response": response})
    n_inst = sum(len(p["strict"]) for p in per_prompt)
    return {
        "prompts": len(per_prompt),
        "instructions": n_inst,
        "prompt_level_strict": _mean(all(p["strict"]) for p in per_prompt),
        "prompt_level_loose": _mean(all(p["loose"]) for p in per_prompt),
        "instruction_level_strict": sum(sum(p["strict"]) for p in per_prompt) / max(n_inst, 1),
        "instruction_level_loose": sum(sum(p["loose"]) for p in per_prompt) / max(n_inst, 1),
        "per_type": {rid: {"n": t["n"], "strict": t["strict"] / t["n"],
                           "loose": t["loose"] / t["n"]} for rid, t in sorted(per_type.items())},
        "details": per_prompt,
    }


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def write_responses(path: Path, prompts: list[EvalPrompt], responses: list[str]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for p, r in zip(prompts, responses, strict=True):
            fh.write(json.dumps({"key": p.key, "prompt": p.prompt, "response": r},
                                ensure_ascii=False) + "\n")
