"""Verifiable requirements: id, keyword arguments, phrasings, a checker, and conflicts.

Ids and keyword-argument names follow the IFEval taxonomy (Zhou et al. 2023,
arXiv 2311.07911) so that evolved prompts can be scored with IFEval-compatible tooling.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Kwargs = dict[str, Any]


@dataclass(frozen=True)
class RequirementType:
    """One checkable kind of requirement."""

    id: str
    sample: Callable[[random.Random], Kwargs]  # draws valid keyword arguments
    phrasings: tuple[str, ...]  # str.format templates over the kwargs
    check: Callable[..., bool]  # check(response, **kwargs) -> bool
    conflicts: frozenset[str] = field(default_factory=frozenset)
    is_format: bool = False  # a candidate of the change_format operation

    def phrase(self, kwargs: Kwargs, rng: random.Random) -> str:
        shown = {
            k: ", ".join(map(repr, v)) if isinstance(v, list) else v for k, v in kwargs.items()
        }
        return rng.choice(self.phrasings).format(**shown)


def _words(text: str) -> list[str]:
    return re.findall(r"\b\w+\b", text)


def _check_number_words(response: str, relation: str, num_words: int) -> bool:
    n = len(_words(response))
    return n < num_words if relation == "less than" else n >= num_words


def _check_bullets(response: str, num_bullets: int) -> bool:
    bullets = re.findall(r"^\s*[*-][^\S\n]+\S", response, flags=re.MULTILINE)
    return len(bullets) == num_bullets


def _check_json(response: str) -> bool:
    text = response.strip()
    text = re.sub(r"^```(?:json|JSON|Json)?\s*|\s*```$", "", text).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _check_keywords(response: str, keywords: list[str]) -> bool:
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


def _check_end(response: str, end_phrase: str) -> bool:
    return response.strip().lower().endswith(end_phrase.strip().lower())


_END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have questions.")
_KEYWORDS = ("example", "reason", "because", "first", "important", "result", "simple", "step")

CATALOGUE: dict[str, RequirementType] = {
    t.id: t
    for t in [
        RequirementType(
            "punctuation:no_comma",
            lambda rng: {},
            ("Do not use any commas in your response.", "Write your whole answer without commas."),
            lambda r: "," not in r,
            frozenset({"detectable_format:json_format"}),
        ),
        RequirementType(
            "change_case:english_lowercase",
            lambda rng: {},
            (
                "Your entire response must be in lowercase letters; no capital letters at all.",
                "Write everything in lowercase, with no capital letters.",
            ),
            lambda r: r == r.lower() and bool(r.strip()),
            frozenset({"detectable_format:title"}),
        ),
        RequirementType(
            "length_constraints:number_words",
            lambda rng: rng.choice(
                [{"relation": "less than", "num_words": rng.choice([60, 80, 100, 150])},
                 {"relation": "at least", "num_words": rng.choice([50, 80, 120])}]
            ),
            (
                "Answer with {relation} {num_words} words.",
                "Your response should contain {relation} {num_words} words.",
            ),
            _check_number_words,
        ),
        RequirementType(
            "detectable_format:number_bullet_lists",
            lambda rng: {"num_bullets": rng.randint(2, 5)},
            (
                "Your answer must contain exactly {num_bullets} bullet points, using markdown"
                " bullets such as:\n* This is a point.",
                "Format the answer as exactly {num_bullets} markdown bullet points (* item).",
            ),
            _check_bullets,
            frozenset({"detectable_format:json_format"}),
            is_format=True,
        ),
        RequirementType(
            "detectable_format:title",
            lambda rng: {},
            (
                "Give your answer a title wrapped in double angular brackets, such as"
                " <<my title>>.",
                "Start with a title in double angular brackets, like <<title>>.",
            ),
            lambda r: bool(re.search(r"<<[^\n]+>>", r)),
            frozenset({"detectable_format:json_format", "change_case:english_lowercase"}),
            is_format=True,
        ),
        RequirementType(
            "detectable_format:json_format",
            lambda rng: {},
            (
                "Wrap your entire output in JSON format; you may use markdown ticks such as ```.",
                "Your whole answer must be valid JSON.",
            ),
            _check_json,
            frozenset({
                "detectable_format:number_bullet_lists", "detectable_format:title",
                "startend:end_checker", "punctuation:no_comma",
            }),
            is_format=True,
        ),
        RequirementType(
            "keywords:existence",
            lambda rng: {"keywords": rng.sample(_KEYWORDS, 2)},
            (
                "Include the keywords {keywords} in the response.",
                "Make sure your answer uses the words {keywords}.",
            ),
            _check_keywords,
        ),
        RequirementType(
            "startend:end_checker",
            lambda rng: {"end_phrase": rng.choice(_END_PHRASES)},
            (
                "Finish your response with this exact phrase: {end_phrase}. No other words"
                " should follow it.",
                "End your answer with the exact phrase \"{end_phrase}\".",
            ),
            _check_end,
            frozenset({"detectable_format:json_format"}),
        ),
    ]
}


def conflicts(a: str, b: str) -> bool:
    """Whether requirement types ``a`` and ``b`` cannot both hold (symmetric)."""
    return a == b or b in CATALOGUE[a].conflicts or a in CATALOGUE[b].conflicts


def compatible_types(present: list[str], *, formats_only: bool = False) -> list[str]:
    """Catalogue ids that conflict with none of ``present``, in catalogue order."""
    return [
        t.id
        for t in CATALOGUE.values()
        if (t.is_format or not formats_only) and not any(conflicts(t.id, p) for p in present)
    ]
