"""Instruction evolution (plain Python, no Ray): operations, the eliminator, and seed chains.

A chain starts at the seed I0 and adds one level per round. Each round picks an operation
reproducibly from (global seed, seed id, level). In ``template`` mode the program appends a
phrased requirement; in ``teacher`` mode the teacher rewrites the instruction from a prompt
template (as ECD does). The eliminator rejects failed evolutions; a rejected level ends the
chain and keeps its earlier levels.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecd_ray.config import EvolutionConfig
from ecd_ray.constraints.catalogue import CATALOGUE, compatible_types
from ecd_ray.engines.base import ChatRequest, Engine, GenerationResult, Sampling, request_seed
from ecd_ray.seeds import normalize

# Directives of the operations that add no program-checkable requirement.
SOFT_DIRECTIVES: dict[str, tuple[str, ...]] = {
    "deepen": (
        "Go beyond the surface: explain why, not only what.",
        "Explain the underlying reasons behind each point you make.",
        "Discuss at least one trade-off or limitation as well.",
    ),
    "concretize": (
        "Ground your answer in one specific, concrete example.",
        "Use a realistic, named scenario to illustrate your answer.",
        "Include specific numbers or details rather than general statements.",
    ),
    "add_reasoning_step": (
        "Before the final answer, lay out your reasoning in short numbered steps.",
        "First state the assumptions you make, then reason from them to your answer.",
        "Show your intermediate reasoning, then give a one-sentence conclusion.",
    ),
}

DEFAULT_TEACHER_TEMPLATE = """I want you to act as an instruction rewriter.
Rewrite the given instruction into a slightly harder version that a capable assistant can
still answer. Keep everything the given instruction asks for, and add exactly this
requirement: {directive}
Do not answer the instruction. Reply with the rewritten instruction only, with no preamble.

Given instruction:
{instruction}"""

_META = re.compile(
    r"(rewritten (prompt|instruction)|given (prompt|instruction)|#\s*\w+ prompt\s*#|"
    r"^\s*(here is|here's) (the|a|your) (rewritten|new|revised|updated)|"
    r"^\s*(new|revised|updated) (prompt|instruction)\s*:)",
    re.IGNORECASE | re.MULTILINE,
)
_REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i'm unable|i am unable|as an ai)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Step:
    """What one evolution round adds: the operation, its text, and its requirement (if any)."""

    operation: str
    directive: str
    requirement_id: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def _rng(global_seed: int, seed_id: str, level: int) -> random.Random:
    digest = hashlib.sha256(f"{global_seed}:{seed_id}:{level}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def pick_step(
    operations: list[str], present: list[str], global_seed: int, seed_id: str, level: int,
    used: tuple[str, ...] = (),
) -> Step:
    """Choose the operation and its directive for ``level`` reproducibly.

    Operations not ``used`` by earlier levels of the chain come first. ``add_requirement`` and
    ``change_format`` draw a requirement type compatible with the ``present`` ones; when none
    is left the draw falls back to another operation.
    """
    rng = _rng(global_seed, seed_id, level)
    ops = list(operations)
    rng.shuffle(ops)
    ops.sort(key=lambda op: op in used)  # stable: keeps the shuffled order within each group
    for op in ops:
        if op in SOFT_DIRECTIVES:
            return Step(op, rng.choice(SOFT_DIRECTIVES[op]))
        candidates = compatible_types(present, formats_only=op == "change_format")
        if candidates:
            rtype = CATALOGUE[rng.choice(candidates)]
            kwargs = rtype.sample(rng)
            return Step(op, rtype.phrase(kwargs, rng), rtype.id, kwargs)
    raise ValueError(f"no operation of {operations} can add a level to seed {seed_id}")


def eliminate(previous: str, candidate: str, max_chars: int) -> str | None:
    """The reason a candidate evolved instruction fails, or None when it is acceptable."""
    text = candidate.strip()
    if not text:
        return "empty"
    if len(text) > max_chars:
        return "too_long"
    if normalize(text) == normalize(previous) or normalize(text) in normalize(previous):
        return "unchanged"
    if _REFUSAL.search(text):
        return "refusal"
    if _META.search(text):
        return "meta_text"
    if "{instruction}" in text or "{directive}" in text or "instruction rewriter" in text.lower():
        return "copied_prompt"
    return None


def answer_problem(result: GenerationResult) -> str | None:
    """The reason a teacher answer cannot be used, or None."""
    if result.error is not None:
        return "engine_error"
    if not result.text.strip():
        return "empty_response"
    if _REFUSAL.search(result.text) and len(result.text.split()) < 60:
        return "refusal"
    return None


@dataclass
class Chain:
    """One seed's levels while it is being evolved; ``to_row`` gives a ``schema.EVOLUTIONS`` row."""

    seed: dict[str, Any]
    levels: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None

    @property
    def alive(self) -> bool:
        return self.stop_reason is None

    @property
    def requirement_ids(self) -> list[str]:
        return [r["id"] for r in self.levels[-1]["requirements"]] if self.levels else []

    def to_row(self, sampling_json: str) -> dict[str, Any]:
        levels = [lvl for lvl in self.levels if lvl["response"] is not None]
        return {
            "seed_id": self.seed["seed_id"],
            "source": self.seed["source"],
            "levels": levels,
            "num_levels": len(levels),
            "stop_reason": self.stop_reason or "completed",
            "rejected_attempts": self.attempts,
            "sampling_json": sampling_json,
        }


def _new_level(level: int, instruction: str, step: Step | None, inherited: list[dict[str, Any]]
               ) -> dict[str, Any]:
    requirements = list(inherited)
    if step is not None and step.requirement_id is not None:
        requirements.append({"id": step.requirement_id, "kwargs_json": json.dumps(step.kwargs),
                             "level": level, "text": step.directive})
    return {
        "level": level, "instruction": instruction,
        "operation": step.operation if step else "seed",
        "added_text": step.directive if step else None, "requirements": requirements,
        "response": None, "response_source": None, "model": None,
        "prompt_tokens": None, "completion_tokens": None, "finish_reason": None,
    }


class ChainRunner:
    """Runs seed chains through ``rounds`` of evolve + answer with one teacher engine.

    Work is batched across the chains of a call: every generation step sends all live chains'
    requests to the engine at once.
    """

    def __init__(self, engine: Engine, evolution: EvolutionConfig, *, rounds: int, seed: int,
                 answer: Sampling, system_prompt: str | None = None,
                 evolver: Engine | None = None):
        self.engine = engine
        self.evolver = evolver or engine  # teacher mode: who rewrites the instructions
        self.cfg = evolution
        self.rounds = rounds
        self.seed = seed
        self.answer_sampling = answer
        self.system_prompt = system_prompt
        self.template = (
            Path(evolution.prompt_template).read_text(encoding="utf-8")
            if evolution.prompt_template else DEFAULT_TEACHER_TEMPLATE
        )

    def sampling_json(self) -> str:
        return json.dumps({
            "answer": self.answer_sampling.to_dict() | {"model": self.engine.model_name},
            "evolution": {"mode": self.cfg.mode, "temperature": self.cfg.temperature,
                          "max_new_tokens": self.cfg.max_new_tokens},
            "seed": self.seed,
        }, sort_keys=True)

    def run(self, seeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Evolve and answer ``seeds`` (rows of ``schema.SEEDS``); one EVOLUTIONS row each."""
        chains = [Chain(s, [_new_level(0, s["instruction"], None, [])]) for s in seeds]
        for chain in chains:
            if chain.seed.get("response"):
                chain.levels[0].update(response=chain.seed["response"], response_source="seed",
                                       model="seed", finish_reason="seed")
        self._answer(chains)
        for level in range(1, self.rounds + 1):
            live = [c for c in chains if c.alive]
            if not live:
                break
            self._evolve(live, level)
            self._answer([c for c in live if c.alive])
        sampling = self.sampling_json()
        return [c.to_row(sampling) for c in chains]

    def _chat(self, text: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": text}]

    def _answer(self, chains: list[Chain]) -> None:
        todo = [c for c in chains if c.alive and c.levels[-1]["response"] is None]
        requests = []
        for c in todo:
            lvl = c.levels[-1]
            rid = f"answer:{c.seed['seed_id']}:{lvl['level']}"
            sampling = Sampling(**{**self.answer_sampling.to_dict(),
                                   "seed": request_seed(self.seed, rid)})
            requests.append(ChatRequest(rid, self._chat(lvl["instruction"]), sampling))
        for c, res in zip(todo, self.engine.generate(requests) if requests else [], strict=True):
            lvl = c.levels[-1]
            problem = answer_problem(res)
            if problem is not None:
                c.stop_reason = f"answer:{problem}"
                c.attempts.append({"level": lvl["level"], "operation": "answer",
                                   "candidate": res.text, "reason": problem})
                continue
            lvl.update(response=res.text, response_source="teacher", model=self.engine.model_name,
                       prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                       finish_reason=res.finish_reason)

    def _evolve(self, chains: list[Chain], level: int) -> None:
        steps = [pick_step(self.cfg.operations, c.requirement_ids, self.seed, c.seed["seed_id"],
                           level, tuple(lvl["operation"] for lvl in c.levels)) for c in chains]
        prev = [c.levels[-1]["instruction"] for c in chains]
        if self.cfg.mode == "template":
            candidates = [f"{p.rstrip()} {s.directive}" for p, s in zip(prev, steps, strict=True)]
        else:
            candidates = self._teacher_rewrites(chains, steps, prev, level)
        for chain, step, before, cand in zip(chains, steps, prev, candidates, strict=True):
            reason = eliminate(before, cand, self.cfg.max_instruction_chars)
            if reason is not None:
                chain.stop_reason = f"evolve:{reason}"
                chain.attempts.append({"level": level, "operation": step.operation,
                                       "candidate": cand, "reason": reason})
                continue
            inherited = chain.levels[-1]["requirements"]
            chain.levels.append(_new_level(level, cand.strip(), step, inherited))

    def _teacher_rewrites(self, chains: list[Chain], steps: list[Step], prev: list[str],
                          level: int) -> list[str]:
        requests = []
        for c, step, before in zip(chains, steps, prev, strict=True):
            rid = f"evolve:{c.seed['seed_id']}:{level}"
            prompt = self.template.format(instruction=before, directive=step.directive)
            sampling = Sampling(temperature=self.cfg.temperature, top_p=0.95,
                                max_new_tokens=self.cfg.max_new_tokens,
                                seed=request_seed(self.seed, rid))
            requests.append(ChatRequest(rid, [{"role": "user", "content": prompt}], sampling))
        return [r.text for r in self.evolver.generate(requests)]
