"""Instruction evolution (plain Python, no Ray): operations, the eliminator, and seed chains.

A chain starts at the seed I0 and adds one level per round. Each round picks an operation
reproducibly from (global seed, seed id, level). In ``template`` mode the program appends a
phrased requirement; in ``teacher`` mode the teacher rewrites the instruction from a prompt
template (as ECD does). The eliminator rejects failed evolutions, and so does
:func:`unstated_requirement` when the new instruction does not state every requirement the level
records (a teacher may drop or change one); a rejected level ends the chain and keeps its earlier
levels.

:class:`Chain` is a small state machine: ``next_request()`` gives the one engine request the
chain waits for (an answer, or a rewrite in teacher mode), ``apply(result)`` advances it. It
knows nothing about batching; :mod:`ecd_ray.scheduler` decides when requests are sent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecd_ray.config import EvolutionConfig
from ecd_ray.constraints.catalogue import CATALOGUE, LANGUAGE_NAMES, compatible_types
from ecd_ray.constraints.stated import stated
from ecd_ray.engines.base import ChatRequest, GenerationResult, Sampling, request_seed
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

# -- wrong language -----------------------------------------------------------------------------
# langdetect is confidently wrong on short text ("Ok" is Afrikaans at p=0.99999), so a text is
# judged only with enough letters and a sure top language; an instruction that names a language
# or asks for a translation is never judged (answering it in another language is the point).
SURE = 0.9
MIN_LETTERS = 20  # an instruction, to name its language at all
CLAUSE_MIN_LETTERS = 10  # a clause, to count its language among a text's (lenient: more found)
ANSWER_MIN_LETTERS = 200  # an answer, to call its language wrong
REWRITE_MIN_LETTERS = 60  # an evolved instruction, to call its language wrong
_DETECT_CHARS = 1000  # langdetect reads this much of a text: enough to be sure, and fast
_OTHER_LANGUAGES = (
    "Chinese", "Mandarin", "Cantonese", "Dutch", "Greek", "Turkish", "Swedish", "Norwegian",
    "Danish", "Czech", "Slovak", "Romanian", "Hungarian", "Indonesian", "Malay", "Latin",
    "Catalan", "Croatian", "Serbian", "Tagalog", "Filipino", "Esperanto", "Irish", "Welsh",
    "Afrikaans", "Estonian", "Latvian", "Lithuanian", "Slovenian", "Albanian", "Icelandic",
)
_NAMES_A_LANGUAGE = re.compile(
    r"\b(" + "|".join(list(LANGUAGE_NAMES.values()) + list(_OTHER_LANGUAGES)) + r")\b|"
    r"language|translat|bilingual|multilingual|langue|idioma|lingua|sprache|übersetz|tradu|"
    r"français|anglais|español|inglés|deutsch|englisch|italiano|português|русск|английск|"
    r"язык|中文|英文|英语|英語|日本語|语言|言語|翻译|翻訳",
    re.IGNORECASE,
)
_FENCED = re.compile(r"```.*?(```|$)", re.DOTALL)  # code blocks have no natural language
# Sentences and clauses: a teacher may join a French seed and an English directive with no
# full stop between them.
_CLAUSES = re.compile(r"(?<=[.!?,;:。！？，；：])\s*|\n+")


@functools.lru_cache(maxsize=1)
def _langdetect() -> Any:
    import langdetect

    langdetect.DetectorFactory.seed = 0  # deterministic, as constraints.checkers runs it
    return langdetect


def _letters(text: str) -> int:
    """Letters, a CJK character (kana, hangul, han) counted as three: it carries about a
    word, and langdetect needs far fewer of them."""
    return sum((3 if ord(c) >= 0x2E80 else 1) for c in text if c.isalpha())


# langdetect splits Chinese text between zh-cn and ko (p=0.57/0.43 on a paragraph): these are
# one language here, so a Chinese answer is surely not English (and CJK answers to CJK
# instructions are never judged).
_CJK = "zh/ja/ko"
_FAMILY = {"zh-cn": _CJK, "zh-tw": _CJK, "ja": _CJK, "ko": _CJK}


def language_of(text: str, min_letters: int = MIN_LETTERS) -> str | None:
    """The language of ``text`` (langdetect's code; ``zh/ja/ko`` for those three) when
    langdetect is sure of it (p >= ``SURE``) and the text has ``min_letters`` letters outside
    code blocks; else None."""
    prose = _FENCED.sub(" ", text)
    if _letters(prose) < min_letters:
        return None
    ld = _langdetect()
    try:
        found = ld.detect_langs(prose[:_DETECT_CHARS])
    except ld.LangDetectException:
        return None
    probs: dict[str, float] = {}
    for lang in found:
        key = _FAMILY.get(lang.lang, lang.lang)
        probs[key] = probs.get(key, 0.0) + lang.prob
    best = max(probs, key=probs.__getitem__)
    return best if probs[best] >= SURE else None


def languages_in(text: str) -> set[str]:
    """Every language :func:`language_of` finds in ``text`` as a whole or in one of its
    sentences or clauses: a text that mixes languages (a French seed with an English
    directive, an English question about a German quote) has them all."""
    found = {language_of(text)}
    found.update(language_of(part, CLAUSE_MIN_LETTERS)
                 for part in _CLAUSES.split(_FENCED.sub(" ", text)))
    return {lang for lang in found if lang is not None}


def wrong_language(instruction: str, text: str, min_letters: int = ANSWER_MIN_LETTERS
                   ) -> bool:
    """Whether ``text`` (an answer, or a rewrite of ``instruction``) is surely in a language
    ``instruction`` is not written in.

    False (not judged) when the instruction names a language or asks for a translation, when
    langdetect is unsure of either text, or when ``text`` has fewer than ``min_letters``
    letters; False too when the text's language occurs in any sentence of the instruction.
    """
    if _NAMES_A_LANGUAGE.search(instruction):
        return False
    found = language_of(text, min_letters)
    if found is None:
        return False
    asked = language_of(instruction)
    return asked is not None and found != asked and found not in languages_in(instruction)


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


def eliminate(previous: str, candidate: str, max_chars: int, prompt: str | None = None
              ) -> str | None:
    """The reason a candidate evolved instruction fails, or None when it is acceptable.

    ``prompt`` is the evolution prompt the teacher was sent (teacher mode). With it the
    candidate is also rejected when it contains the whole prompt (echoed back) or when it
    changed language. Template mode (no prompt) appends program text: neither can happen.
    """
    text = candidate.strip()
    if not text:
        return "empty"
    if len(text) > max_chars:
        return "too_long"
    if normalize(text) == normalize(previous) or normalize(text) in normalize(previous):
        return "unchanged"
    if prompt is not None and normalize(prompt) in normalize(text):
        return "echoed_prompt"
    if _REFUSAL.search(text):
        return "refusal"
    if _META.search(text):
        return "meta_text"
    if "{instruction}" in text or "{directive}" in text or "instruction rewriter" in text.lower():
        return "copied_prompt"
    # A rewrite keeps the instruction's language: some sentence of it must still be in that
    # language (the directives added are English, so a French seed's rewrite mixes the two).
    if prompt is not None and wrong_language(previous, text, REWRITE_MIN_LETTERS) and \
            language_of(previous) not in languages_in(text):
        return "wrong_language"
    return None


def unstated_requirement(instruction: str, requirements: list[dict[str, Any]]) -> str | None:
    """What the first of ``requirements`` (level records with ``id`` and ``kwargs_json``) that
    ``instruction`` does not state is missing, or None when it states them all."""
    for req in requirements:
        missing = stated(req["id"], json.loads(req["kwargs_json"]), instruction)
        if missing is not None:
            return f"{req['id']}: {missing}"
    return None


def answer_problem(result: GenerationResult, instruction: str | None = None) -> str | None:
    """The reason a teacher answer to ``instruction`` cannot be used, or None.

    Without ``instruction`` only the answer itself is judged (no echo or language check).
    """
    if result.finish_reason == "error" or result.error is not None:
        return result.error_code or "engine_error"
    if not result.text.strip():
        return "empty_response"
    if _REFUSAL.search(result.text) and len(result.text.split()) < 60:
        return "refusal"
    if instruction is None:
        return None
    if normalize(result.text) == normalize(instruction):
        return "echoed_prompt"
    if wrong_language(instruction, result.text):
        return "wrong_language"
    return None


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
        "apc": None, "responses": [], "judgements": [],
    }


JUDGE_TEMPLATE = """Two assistants answered the same instruction.

Instruction:
{instruction}

Answer A:
{a}

Answer B:
{b}

Which answer follows the instruction better, including every requirement it states? Reply
with one letter: A or B."""

_VERDICT = re.compile(r"\b([AB])\b")


def judge_verdict(text: str) -> str | None:
    """The judge's choice, "A" or "B" (the first standalone letter), or None if it gave none."""
    m = _VERDICT.search(text.strip())
    return m.group(1) if m else None


def judge_positions(global_seed: int, seed_id: str, level: int, good: str, bad: str) -> bool:
    """True when the stronger answer is shown as A: a stable coin per pair, so the judge's
    preference for a position does not side with one rank."""
    key = f"judge:{global_seed}:{seed_id}:{level}:{good}:{bad}".encode()
    return hashlib.sha256(key).digest()[0] & 1 == 0


@dataclass(frozen=True)
class ResponderSpec:
    """An APC responder as a chain sees it: a name, a rank and how it samples; a responder
    ``from_teacher`` reuses the teacher's answer and sends nothing."""

    name: str
    rank: int
    model: str
    sampling: Sampling
    from_teacher: bool = False


def apc_prompt(strategy: str, fraction: float, global_seed: int, seed_id: str, level: int
               ) -> bool:
    """Whether level ``level`` of a chain is an APC prompt (its pairs come from responders).

    ``apc``: every level. ``mixed``: an evolved level (>= 1) with probability ``fraction``, by a
    stable hash of (global seed, seed id, level), so a resumed run assigns it the same way;
    level 0 stays out, as it has no ECD pair to trade. ``ecd``: none.
    """
    if strategy == "apc":
        return True
    if strategy != "mixed" or level < 1 or fraction <= 0:
        return False
    digest = hashlib.sha256(f"apc:{global_seed}:{seed_id}:{level}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


@dataclass(frozen=True)
class ChainSettings:
    """What every chain of a run shares: rounds, seeds, sampling, prompts."""

    evolution: EvolutionConfig
    rounds: int
    seed: int
    answer: Sampling
    system_prompt: str | None = None
    answer_model: str = "teacher"
    template: str = DEFAULT_TEACHER_TEMPLATE
    # APC (strategy apc / mixed): the responders, strongest first, and the share of levels
    strategy: str = "ecd"
    responders: tuple[ResponderSpec, ...] = ()
    apc_fraction: float = 0.0
    # pairs.truncated_chosen=regenerate: a teacher answer cut at its limit is asked once more
    # with this many new tokens (None: never)
    regenerate_max_new_tokens: int | None = None
    # apc.filter with a judge: how the judge samples (None: no judge), and which rank pairs
    # the pair stage will form (the judge is asked about exactly those)
    judge: Sampling | None = None
    rank_pairs: str = "adjacent"

    @classmethod
    def build(cls, evolution: EvolutionConfig, *, rounds: int, seed: int, answer: Sampling,
              system_prompt: str | None = None, answer_model: str = "teacher",
              strategy: str = "ecd", responders: tuple[ResponderSpec, ...] = (),
              apc_fraction: float = 0.0, regenerate_max_new_tokens: int | None = None,
              judge: Sampling | None = None, rank_pairs: str = "adjacent",
              ) -> ChainSettings:
        template = (Path(evolution.prompt_template).read_text(encoding="utf-8")
                    if evolution.prompt_template else DEFAULT_TEACHER_TEMPLATE)
        return cls(evolution, rounds, seed, answer, system_prompt, answer_model, template,
                   strategy, responders, apc_fraction, regenerate_max_new_tokens, judge,
                   rank_pairs)

    def sampling_json(self) -> str:
        out: dict[str, Any] = {
            "answer": self.answer.to_dict() | {"model": self.answer_model},
            "evolution": {"mode": self.evolution.mode,
                          "temperature": self.evolution.temperature,
                          "max_new_tokens": self.evolution.max_new_tokens},
            "seed": self.seed,
        }
        if self.responders:
            out["apc"] = {"strategy": self.strategy, "fraction": self.apc_fraction,
                          "responders": [{"name": r.name, "rank": r.rank, "model": r.model,
                                          "from_teacher": r.from_teacher,
                                          **r.sampling.to_dict()} for r in self.responders]}
        if self.regenerate_max_new_tokens:
            out["regenerate_max_new_tokens"] = self.regenerate_max_new_tokens
        if self.judge is not None:
            out["judge"] = self.judge.to_dict() | {"rank_pairs": self.rank_pairs}
        return json.dumps(out, sort_keys=True)


@dataclass(frozen=True)
class PendingRequest:
    """The request a chain waits for; ``role`` is "answer" (teacher), "evolve" (evolver) or
    "respond:<name>" (an APC responder)."""

    role: str
    request: ChatRequest


@dataclass
class Chain:
    """One seed's levels while it is being evolved; ``to_row`` gives a ``schema.EVOLUTIONS`` row.

    The chain alternates answer(Ik) and evolve(I(k+1)); in template mode evolving needs no
    engine and happens inside ``next_request``.
    """

    seed: dict[str, Any]
    settings: ChainSettings
    levels: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    _pending: PendingRequest | None = None
    _step: Step | None = None
    # levels answered once more with a larger budget, and the cut answer each replaced
    _regenerated: dict[int, GenerationResult] = field(default_factory=dict)
    # (level, responder) pairs asked already (answered or failed)
    _responded: set[tuple[int, str]] = field(default_factory=set)
    # (level, stronger, weaker) responder pairs the judge was asked about
    _judged: set[tuple[int, str, str]] = field(default_factory=set)
    _judging: tuple[str, str, bool] | None = None

    def __post_init__(self) -> None:
        self.levels = [_new_level(0, self.seed["instruction"], None, [])]
        if self.seed.get("response"):
            self.levels[0].update(response=self.seed["response"], response_source="seed",
                                  model="seed", finish_reason="seed")

    @property
    def seed_id(self) -> str:
        return str(self.seed["seed_id"])

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def requirement_ids(self) -> list[str]:
        return [r["id"] for r in self.levels[-1]["requirements"]] if self.levels else []

    def next_request(self) -> PendingRequest | None:
        """The request the chain needs next, or None when it has finished."""
        if self._pending is not None:
            return self._pending
        while not self.done:
            last = self.levels[-1]
            if last["response"] is None:
                self._pending = PendingRequest("answer", self._answer_request(last))
                return self._pending
            respond = self._respond_request(last)
            if respond is not None:
                self._pending = respond
                return self._pending
            level = last["level"] + 1
            if level > self.settings.rounds:
                self.stop_reason = "completed"
                break
            step = pick_step(self.settings.evolution.operations, self.requirement_ids,
                             self.settings.seed, self.seed_id, level,
                             tuple(lvl["operation"] for lvl in self.levels))
            if self.settings.evolution.mode == "template":
                self._accept_rewrite(level, step, f"{last['instruction'].rstrip()} "
                                                  f"{step.directive}")
                continue
            self._step = step
            self._pending = PendingRequest("evolve", self._evolve_request(level, step))
            return self._pending
        return None

    def apply(self, result: GenerationResult) -> None:
        """Advance the chain with the result of the request ``next_request`` gave."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError(f"chain {self.seed_id}: a result arrived with no request pending")
        if pending.role == "answer":
            self._apply_answer(result)
        elif pending.role.startswith("respond:"):
            self._apply_response(pending.role.split(":", 1)[1], result)
        elif pending.role == "judge":
            self._apply_judgement(result)
        else:
            self._apply_rewrite(result, pending.request.messages[-1]["content"])

    # -- internals ------------------------------------------------------------------------

    def _chat(self, text: str) -> list[dict[str, str]]:
        system = self.settings.system_prompt
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}]

    def _answer_request(self, lvl: dict[str, Any]) -> ChatRequest:
        rid = f"answer:{self.seed_id}:{lvl['level']}"
        extra: dict[str, Any] = {}
        if lvl["level"] in self._regenerated:
            rid += ":regenerate"
            extra["max_new_tokens"] = self.settings.regenerate_max_new_tokens
        sampling = Sampling(**{**self.settings.answer.to_dict(), **extra,
                               "seed": request_seed(self.settings.seed, rid)})
        return ChatRequest(rid, self._chat(lvl["instruction"]), sampling)

    def _respond_request(self, lvl: dict[str, Any]) -> PendingRequest | None:
        """The next APC responder request of an answered level, or None when it has none."""
        if lvl["apc"] is None:
            s = self.settings
            lvl["apc"] = bool(s.responders) and apc_prompt(
                s.strategy, s.apc_fraction, s.seed, self.seed_id, lvl["level"])
        if not lvl["apc"]:
            return None
        for r in self.settings.responders:
            if r.from_teacher or (lvl["level"], r.name) in self._responded:
                continue
            rid = f"respond:{r.name}:{self.seed_id}:{lvl['level']}"
            sampling = Sampling(**{**r.sampling.to_dict(),
                                   "seed": request_seed(self.settings.seed, rid)})
            return PendingRequest(f"respond:{r.name}",
                                  ChatRequest(rid, self._chat(lvl["instruction"]), sampling))
        return self._judge_request(lvl)

    def _judge_request(self, lvl: dict[str, Any]) -> PendingRequest | None:
        """The next judge request of an APC level whose responders have all answered: one per
        rank pair the pair stage will form (``apc.filter`` with a judge)."""
        if self.settings.judge is None:
            return None
        from ecd_ray.pairs import level_answers, rank_pairs

        teacher = next(({"name": r.name, "rank": r.rank} for r in self.settings.responders
                        if r.from_teacher), None)
        answers = level_answers(lvl, teacher)
        for hi, lo in rank_pairs([a["rank"] for a in answers], self.settings.rank_pairs):
            for good in (a for a in answers if a["rank"] == hi):
                for bad in (a for a in answers if a["rank"] == lo):
                    key = (lvl["level"], good["responder"], bad["responder"])
                    if key in self._judged:
                        continue
                    good_first = judge_positions(self.settings.seed, self.seed_id, *key)
                    a, b = (good, bad) if good_first else (bad, good)
                    prompt = JUDGE_TEMPLATE.format(instruction=lvl["instruction"],
                                                   a=a["response"], b=b["response"])
                    rid = f"judge:{self.seed_id}:{key[0]}:{key[1]}:{key[2]}"
                    sampling = Sampling(**{**self.settings.judge.to_dict(),
                                           "seed": request_seed(self.settings.seed, rid)})
                    self._judging = (key[1], key[2], good_first)
                    return PendingRequest("judge", ChatRequest(
                        rid, [{"role": "user", "content": prompt}], sampling))
        return None

    def _apply_judgement(self, res: GenerationResult) -> None:
        """Record the judge's verdict on a (stronger, weaker) pair: "chosen" when it prefers
        the stronger answer, "rejected" when the weaker, "unclear" when it names neither."""
        lvl = self.levels[-1]
        if self._judging is None:
            raise RuntimeError(f"chain {self.seed_id}: a verdict arrived with no pair pending")
        good, bad, good_first = self._judging
        self._judging = None
        self._judged.add((lvl["level"], good, bad))
        if res.finish_reason == "error":
            self.attempts.append({"level": lvl["level"], "operation": "judge",
                                  "candidate": res.error or "",
                                  "reason": res.error_code or "engine_error"})
            verdict = "unclear"
        else:
            letter = judge_verdict(res.text)
            verdict = ("unclear" if letter is None else
                       "chosen" if (letter == "A") == good_first else "rejected")
        lvl["judgements"].append({"chosen": good, "rejected": bad, "verdict": verdict,
                                  "raw": res.text[:200]})

    def _apply_response(self, name: str, res: GenerationResult) -> None:
        """An APC responder's answer: kept on the level, or a rejected attempt (the chain
        goes on either way: one responder's failure costs only its pairs)."""
        lvl = self.levels[-1]
        self._responded.add((lvl["level"], name))
        problem = answer_problem(res, lvl["instruction"])
        if problem is not None:
            detail = res.text if res.finish_reason != "error" else (res.error or "")
            self.attempts.append({"level": lvl["level"], "operation": f"respond:{name}",
                                  "candidate": detail, "reason": problem})
            return
        spec = next(r for r in self.settings.responders if r.name == name)
        lvl["responses"].append({
            "responder": name, "rank": spec.rank, "model": spec.model, "response": res.text,
            "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "finish_reason": res.finish_reason})

    def _evolve_request(self, level: int, step: Step) -> ChatRequest:
        rid = f"evolve:{self.seed_id}:{level}"
        ev = self.settings.evolution
        prompt = self.settings.template.format(instruction=self.levels[-1]["instruction"],
                                               directive=step.directive)
        sampling = Sampling(temperature=ev.temperature, top_p=0.95,
                            max_new_tokens=ev.max_new_tokens,
                            seed=request_seed(self.settings.seed, rid))
        return ChatRequest(rid, [{"role": "user", "content": prompt}], sampling)

    def _apply_answer(self, res: GenerationResult) -> None:
        lvl = self.levels[-1]
        level = lvl["level"]
        if res.finish_reason == "length" and self.settings.regenerate_max_new_tokens and \
                level not in self._regenerated and \
                answer_problem(res, lvl["instruction"]) is None:
            # Cut at its limit: ask once more with the larger budget (next_request does).
            self._regenerated[level] = res
            self.attempts.append({"level": level, "operation": "answer",
                                  "candidate": res.text, "reason": "truncated_regenerated"})
            return
        if level in self._regenerated and res.finish_reason == "error":
            res = self._regenerated[level]  # the second try failed: keep the cut answer
        problem = answer_problem(res, lvl["instruction"])
        if problem is not None:
            self.stop_reason = f"answer:{problem}"
            detail = res.text if res.finish_reason != "error" else (res.error or "")
            self.attempts.append({"level": lvl["level"], "operation": "answer",
                                  "candidate": detail, "reason": problem})
            return
        lvl.update(response=res.text, response_source="teacher",
                   model=self.settings.answer_model, prompt_tokens=res.prompt_tokens,
                   completion_tokens=res.completion_tokens, finish_reason=res.finish_reason)

    def _apply_rewrite(self, res: GenerationResult, prompt: str) -> None:
        step, self._step = self._step, None
        if step is None:
            raise RuntimeError(f"chain {self.seed_id}: a rewrite arrived with no step pending")
        level = self.levels[-1]["level"] + 1
        if res.finish_reason == "error":
            reason = res.error_code or "engine_error"
            self.stop_reason = f"evolve:{reason}"
            self.attempts.append({"level": level, "operation": step.operation,
                                  "candidate": res.error or "", "reason": reason})
            return
        if res.finish_reason == "length":
            # cut at evolution.max_new_tokens: half an instruction, whatever it still states
            self._reject_rewrite(level, step, res.text, "truncated")
            return
        self._accept_rewrite(level, step, res.text, prompt)

    def _accept_rewrite(self, level: int, step: Step, candidate: str,
                        prompt: str | None = None) -> None:
        before = self.levels[-1]["instruction"]
        reason = eliminate(before, candidate, self.settings.evolution.max_instruction_chars,
                           prompt)
        new = _new_level(level, candidate.strip(), step, self.levels[-1]["requirements"])
        # the level records its requirements (inherited and drawn): the text must state them
        if reason is None and unstated_requirement(new["instruction"],
                                                   new["requirements"]) is not None:
            reason = "requirement_not_stated"
        if reason is not None:
            self._reject_rewrite(level, step, candidate, reason)
            return
        self.levels.append(new)

    def _reject_rewrite(self, level: int, step: Step, candidate: str, reason: str) -> None:
        self.stop_reason = f"evolve:{reason}"
        self.attempts.append({"level": level, "operation": step.operation,
                              "candidate": candidate, "reason": reason})

    def to_row(self) -> dict[str, Any]:
        """The chain as a ``schema.EVOLUTIONS`` row (answered levels only; no ``worker``)."""
        levels = [lvl for lvl in self.levels if lvl["response"] is not None]
        return {
            "seed_id": self.seed_id,
            "source": self.seed["source"],
            "levels": levels,
            "num_levels": len(levels),
            "stop_reason": self.stop_reason or "completed",
            "rejected_attempts": self.attempts,
            "sampling_json": self.settings.sampling_json(),
        }


def template_levels(seed: dict[str, Any], evolution: EvolutionConfig, *, rounds: int,
                    global_seed: int) -> list[dict[str, Any]]:
    """The unanswered levels a template-mode :class:`Chain` gives ``seed`` (a SEEDS row):
    the same steps, directives and requirements, without asking any engine. Used to build
    evaluation prompts from seeds that never reach training."""
    seed_id = str(seed["seed_id"])
    levels = [_new_level(0, seed["instruction"], None, [])]
    for level in range(1, rounds + 1):
        last = levels[-1]
        step = pick_step(evolution.operations, [r["id"] for r in last["requirements"]],
                         global_seed, seed_id, level, tuple(lvl["operation"] for lvl in levels))
        candidate = f"{last['instruction'].rstrip()} {step.directive}"
        if eliminate(last["instruction"], candidate, evolution.max_instruction_chars):
            break
        levels.append(_new_level(level, candidate.strip(), step, last["requirements"]))
    return levels
