"""Evolution steps, the eliminator, and the ECD pairing rule (plain Python, no Ray)."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from ecd_ray.config import EVOLUTION_OPERATIONS, EvolutionConfig
from ecd_ray.constraints.catalogue import CATALOGUE, compatible_types, conflicts
from ecd_ray.engines.base import PROMPT_TOO_LONG, ChatRequest, GenerationResult, Sampling, failed
from ecd_ray.evolution import (
    DEFAULT_TEACHER_TEMPLATE,
    Chain,
    ChainSettings,
    answer_problem,
    eliminate,
    pick_step,
    unstated_requirement,
    wrong_language,
)
from ecd_ray.pairs import build_pairs, chain_rejects
from ecd_ray.scheduler import ChainScheduler
from ecd_ray.verify import annotate_levels

OPS = list(EVOLUTION_OPERATIONS)


def test_step_choice_is_reproducible_and_depends_on_seed_and_level() -> None:
    a = [pick_step(OPS, [], 0, f"s{i}", 1) for i in range(50)]
    b = [pick_step(OPS, [], 0, f"s{i}", 1) for i in range(50)]
    assert a == b
    assert a != [pick_step(OPS, [], 1, f"s{i}", 1) for i in range(50)]
    assert {s.operation for s in a} == set(OPS)  # every operation gets used


@given(st.lists(st.sampled_from(sorted(CATALOGUE)), max_size=4), st.integers(0, 10_000))
def test_drawn_requirement_never_conflicts_with_present_ones(present: list[str], seed: int) -> None:
    step = pick_step(["add_requirement", "change_format", "deepen"], present, seed, "x", 1)
    if step.requirement_id is not None:
        assert not any(conflicts(step.requirement_id, p) for p in present)


def test_change_format_only_draws_format_requirements() -> None:
    for i in range(40):
        step = pick_step(["change_format"], [], 0, f"s{i}", 1)
        assert step.requirement_id is not None and CATALOGUE[step.requirement_id].is_format


def test_eliminator_reasons() -> None:
    prev = "Explain photosynthesis."
    assert eliminate(prev, "", 4000) == "empty"
    assert eliminate(prev, "  explain   PHOTOSYNTHESIS. ", 4000) == "unchanged"
    assert eliminate(prev, "Explain", 4000) == "unchanged"
    assert eliminate(prev, "I'm sorry, but I cannot help with that.", 4000) == "refusal"
    assert eliminate(prev, "Rewritten Prompt: Explain photosynthesis in 3 steps.", 4000) \
        == "meta_text"
    assert eliminate(prev, "Here is the rewritten instruction:\nExplain it.", 4000) == "meta_text"
    assert eliminate(prev, "Explain {instruction} with steps.", 4000) == "copied_prompt"
    assert eliminate(prev, "Explain photosynthesis " + "in detail " * 500, 4000) == "too_long"
    assert eliminate(prev, "Explain photosynthesis to a ten-year-old in three steps.", 4000) \
        is None


EN = "Explain how photosynthesis works to a ten-year-old, in three short steps."
FR = "Explique comment fonctionne la photosynthèse à un enfant de dix ans, en trois étapes."
EN_ANSWER = (
    "Photosynthesis is how plants make their own food. First, the leaves catch sunlight. "
    "Second, the plant pulls in water through its roots and carbon dioxide from the air. "
    "Third, it uses the light's energy to turn them into sugar and releases oxygen. That sugar "
    "is the energy the plant lives on, and the oxygen is what we breathe.")
FR_ANSWER = (
    "La photosynthèse, c'est la façon dont les plantes fabriquent leur nourriture. D'abord, "
    "les feuilles captent la lumière du soleil. Ensuite, la plante puise de l'eau par ses "
    "racines et du dioxyde de carbone dans l'air. Enfin, elle transforme tout cela en sucre "
    "et rejette de l'oxygène, celui que nous respirons.")
DE_ANSWER = (
    "Die Photosynthese ist ein Vorgang, bei dem Pflanzen mit Hilfe von Sonnenlicht aus Wasser "
    "und Kohlendioxid Zucker und Sauerstoff herstellen. Zuerst nehmen die Blätter das Licht "
    "auf. Dann wird das Wasser gespalten. Schließlich entsteht Zucker, der der Pflanze Energie "
    "gibt, und Sauerstoff, den wir atmen.")
ZH_ANSWER = (
    "光合作用是植物利用阳光、水和二氧化碳制造糖和氧气的过程。首先，叶子吸收阳光。然后，水被分解。"
    "最后，植物产生糖，为自己提供能量。这个过程对地球上的生命非常重要。")


def _said(text: str, finish_reason: str = "stop") -> GenerationResult:
    return GenerationResult(text, 5, 7, finish_reason)


def test_answer_in_another_language_than_the_instruction_is_rejected() -> None:
    assert answer_problem(_said(DE_ANSWER), EN) == "wrong_language"
    assert answer_problem(_said(ZH_ANSWER), EN) == "wrong_language"  # langdetect: zh or ko
    assert answer_problem(_said(EN_ANSWER), FR) == "wrong_language"
    # without the instruction only the answer itself is judged
    assert answer_problem(_said(DE_ANSWER)) is None


def test_legitimate_answers_are_not_judged_wrong_language() -> None:
    assert answer_problem(_said(EN_ANSWER), EN) is None
    assert answer_problem(_said(FR_ANSWER), FR) is None  # French for a French instruction
    # short answers: langdetect is not reliable there ("Ok" is Afrikaans to it)
    assert answer_problem(_said("Die Photosynthese ist toll, ja."), EN) is None
    assert answer_problem(_said("Ok"), EN) is None
    # the instruction asks for a language, or for a translation
    assert answer_problem(_said(DE_ANSWER), EN + " Write your answer in German.") is None
    assert answer_problem(_said(DE_ANSWER), "Please translate the text below for me: "
                          + EN_ANSWER) is None
    # an instruction too short to tell its language is not judged ("et" p=0.57 to langdetect)
    assert answer_problem(_said(DE_ANSWER), "Write a haiku about autumn.") is None
    # an instruction that itself holds text in the answer's language (a quote to summarise)
    assert answer_problem(_said(EN_ANSWER), "Summarize this: " + DE_ANSWER) is None
    # code has no natural language: only the prose around it counts
    code = "```python\n" + "total = price * quantity  # the line total\n" * 30 + "```\nDone."
    assert answer_problem(_said(code), EN) is None
    assert not wrong_language(EN, FR_ANSWER, min_letters=10_000)  # too short for this bar


def test_answer_that_echoes_the_instruction_is_rejected() -> None:
    assert answer_problem(_said(EN), EN) == "echoed_prompt"
    assert answer_problem(_said("  " + EN.upper() + "\n"), EN) == "echoed_prompt"
    # repeating the request before answering it (an IFEval task) is an answer
    assert answer_problem(_said(EN + "\n\n" + EN_ANSWER), EN) is None
    assert answer_problem(_said("I'm sorry, but I can't help with that."), EN) == "refusal"
    assert answer_problem(_said(""), EN) == "empty_response"


def test_rewrite_that_echoes_the_prompt_or_changes_language_is_rejected() -> None:
    prompt = DEFAULT_TEACHER_TEMPLATE.format(instruction=EN, directive="Use three bullets.")
    assert eliminate(EN, prompt, 4000, prompt) == "echoed_prompt"
    assert eliminate(EN, "Sure.\n" + prompt, 4000, prompt) == "echoed_prompt"
    assert eliminate(EN, prompt, 4000) == "meta_text"  # no prompt given: caught less exactly
    assert eliminate(EN, DE_ANSWER, 4000, prompt) == "wrong_language"
    assert eliminate(EN, ZH_ANSWER, 4000, prompt) == "wrong_language"
    assert eliminate(EN, EN + " Use three bullets.", 4000, prompt) is None
    # a French seed rewritten with the English directive keeps its French sentence: fine,
    # with or without a full stop between them
    for joined in (FR + " Go beyond the surface: explain why, not only what.",
                   FR[:-1] + " go beyond the surface: explain why, not only what."):
        assert eliminate(FR, joined, 4000, prompt) is None
    # ... even when the English it gained outweighs the French it kept
    short_fr = "Explique la photosynthèse à un enfant."
    gained = (" Before the final answer, lay out your reasoning in short numbered steps. Show "
              "your intermediate reasoning, then give a one-sentence conclusion that a child "
              "would understand. Use a realistic, named scenario to illustrate your answer.")
    assert wrong_language(short_fr, short_fr + gained, 60)  # English as a whole: judged...
    assert eliminate(short_fr, short_fr + gained, 4000, prompt) is None  # ...and kept
    # template mode (no prompt) appends program text: never judged by language
    assert eliminate(EN, EN + " " + DE_ANSWER, 4000) is None


def test_rewrite_cut_at_its_token_limit_is_rejected() -> None:
    def teacher(req: ChatRequest) -> object:
        text = req.messages[-1]["content"]
        if "instruction rewriter" in text:
            whole = text.rsplit("\n", 1)[-1] + " " + _directive(text)
            return _said(whole[: len(whole) // 2], "length")
        return "an answer " + req.request_id

    rows = _run(ScriptedEngine(teacher), _seeds(1), rounds=1,
                evolution=EvolutionConfig(mode="teacher"))
    assert rows[0]["stop_reason"] == "evolve:truncated" and rows[0]["num_levels"] == 1
    assert [a["reason"] for a in rows[0]["rejected_attempts"]] == ["truncated"]


def _chain(responses: list[str]) -> dict:
    levels = [{"level": i, "instruction": f"I{i}", "operation": "seed" if i == 0 else "deepen",
               "requirements": [], "response": r, "model": "m", "finish_reason": "stop"}
              for i, r in enumerate(responses)]
    return annotate_levels({"seed_id": "s", "source": "f:1", "levels": levels,
                            "stop_reason": "completed", "rejected_attempts": []})


def test_pairing_rule_hard_negative_is_the_previous_level() -> None:
    pairs, rejects = build_pairs(_chain(["R0", "R1", "R2", "R3"]))
    assert [(p["chosen_level"], p["rejected_level"]) for p in pairs] == [(1, 0), (2, 1), (3, 2)]
    for p in pairs:
        k = p["chosen_level"]
        assert p["prompt"] == [{"role": "user", "content": f"I{k}"}]
        assert p["chosen"] == [{"role": "assistant", "content": f"R{k}"}]
        assert p["rejected"] == [{"role": "assistant", "content": f"R{k - 1}"}]
    assert rejects == []


def test_older_levels_as_further_negatives() -> None:
    pairs, _ = build_pairs(_chain(["R0", "R1", "R2"]), max_negative_gap=2)
    assert [(p["chosen_level"], p["rejected_level"]) for p in pairs] == [(1, 0), (2, 1), (2, 0)]
    assert len({p["pair_id"] for p in pairs}) == 3


def test_identical_answers_are_rejected_and_a_pairless_seed_is_accounted_for() -> None:
    pairs, rejects = build_pairs(_chain(["same", "same"]))
    assert pairs == []
    assert [r["reason"] for r in rejects] == ["identical_responses", "no_pairs"]
    _, rejects = build_pairs(_chain(["only R0"]))
    assert [r["reason"] for r in rejects] == ["no_pairs"]


@dataclass
class ScriptedEngine:
    """An async engine whose answers are given by a function: stands in for a teacher LLM in
    chain-logic tests only (the real engines are exercised in test_pipeline.py). ``delay``
    gives each request a duration, so scheduling order can be observed."""

    answer: object
    model_name: str = "scripted"
    capacity: int = 4
    delay: object = None
    seen: list[ChatRequest] = field(default_factory=list)
    log: list[tuple[str, str]] = field(default_factory=list)

    async def agenerate(self, request: ChatRequest) -> GenerationResult:
        self.seen.append(request)
        self.log.append(("start", request.request_id))
        if self.delay is not None:
            await asyncio.sleep(self.delay(request))  # type: ignore[operator]
        self.log.append(("end", request.request_id))
        text = self.answer(request)  # type: ignore[operator]
        if isinstance(text, GenerationResult):
            return text
        return GenerationResult(text, 5, 7, "stop")

    def close(self) -> None:
        pass


def _run(engine: ScriptedEngine, seeds: list[dict], mode: str = "continuous", rounds: int = 3,
         evolution: EvolutionConfig | None = None, **kw: object) -> list[dict]:
    settings = ChainSettings.build(evolution or EvolutionConfig(operations=["add_requirement"]),
                                   rounds=rounds, seed=0, answer=Sampling(),
                                   answer_model=engine.model_name)
    sched = ChainScheduler(engine, settings, mode=mode, **kw)  # type: ignore[arg-type]
    rows: list[dict] = []
    asyncio.run(sched.run(seeds, lambda c: rows.append(c.to_row())))
    return rows


def _seeds(n: int) -> list[dict]:
    return [{"seed_id": f"s{i}", "source": f"f:{i}", "instruction": f"Describe animal {i}.",
             "response": None} for i in range(n)]


def test_chain_template_mode_levels_and_inheritance() -> None:
    eng = ScriptedEngine(lambda r: f"answer to: {r.messages[-1]['content'][-30:]}")
    rows = _run(eng, [{"seed_id": "a", "source": "f:1", "instruction": "Describe a cat.",
                       "response": None},
                      {"seed_id": "b", "source": "f:2", "instruction": "Describe a dog.",
                       "response": "A dog is a loyal animal."}])
    a, b = sorted(rows, key=lambda r: r["seed_id"])
    assert a["num_levels"] == 4 and a["stop_reason"] == "completed"
    assert b["levels"][0]["response_source"] == "seed"
    assert b["levels"][0]["response"] == "A dog is a loyal animal."
    for row in rows:
        reqs = [lvl["requirements"] for lvl in row["levels"]]
        assert [len(r) for r in reqs] == [0, 1, 2, 3]  # each level inherits the ones below
        for k in range(1, 4):
            assert reqs[k][:-1] == reqs[k - 1]
            assert row["levels"][k]["instruction"].startswith(row["levels"][k - 1]["instruction"])
    # 4 answers for a, 3 for b (its R0 came with the seed); template mode asks no rewrites
    assert len(eng.seen) == 7
    assert len({r.sampling.seed for r in eng.seen}) == 7  # per-request sampler seeds


def _directive(rewrite_prompt: str) -> str:
    """The requirement text a default teacher prompt asks the rewriter to add."""
    found = re.search(r"requirement: (.*)\nDo not answer", rewrite_prompt, flags=re.DOTALL)
    assert found is not None
    return found.group(1)


def test_chain_teacher_mode_rejects_meta_text_and_keeps_earlier_levels() -> None:
    def teacher(req: ChatRequest) -> str:
        text = req.messages[-1]["content"]
        if "instruction rewriter" in text:
            return "Rewritten prompt: do it" if "evolve:bad:2" == req.request_id else \
                text.rsplit("\n", 1)[-1] + " " + _directive(text)
        return "an answer " + req.request_id

    rows = _run(ScriptedEngine(teacher), [
        {"seed_id": "good", "source": "f:1", "instruction": "Name a color.", "response": None},
        {"seed_id": "bad", "source": "f:2", "instruction": "Name a fruit.", "response": None},
    ], evolution=EvolutionConfig(mode="teacher"))
    good, bad = sorted(rows, key=lambda r: r["seed_id"], reverse=True)
    assert good["num_levels"] == 4
    assert bad["num_levels"] == 2 and bad["stop_reason"] == "evolve:meta_text"
    assert bad["rejected_attempts"][0]["level"] == 2


def test_a_refused_request_stops_only_its_chain_and_keeps_its_levels() -> None:
    def answer(req: ChatRequest) -> object:
        if req.request_id == "answer:s1:2":
            return failed(PROMPT_TOO_LONG, "9000 prompt tokens + 256 new tokens > 4096")
        return "fine " + req.request_id

    rows = {r["seed_id"]: r for r in _run(ScriptedEngine(answer), _seeds(3))}
    assert rows["s1"]["stop_reason"] == "answer:prompt_too_long"
    assert rows["s1"]["num_levels"] == 2  # R0 and R1 are kept
    assert rows["s1"]["rejected_attempts"][0]["reason"] == "prompt_too_long"
    assert rows["s0"]["num_levels"] == rows["s2"]["num_levels"] == 4


def test_continuous_chains_do_not_wait_for_each_other() -> None:
    """A chain whose answers are slow must not hold back the others: with lock-step batches
    every step waits for it; with continuous chains the fast ones finish all their levels
    before the slow one finishes its first."""
    slow = lambda r: 0.2 if r.request_id.startswith("answer:s0:") else 0.01  # noqa: E731
    eng = ScriptedEngine(lambda r: "ok " + r.request_id, delay=slow, capacity=8)
    finished: list[str] = []
    order = [r["seed_id"] for r in _run(eng, _seeds(4))]
    finished = order
    assert finished[-1] == "s0"
    first_slow_end = eng.log.index(("end", "answer:s0:0"))
    assert ("end", "answer:s1:3") in eng.log[:first_slow_end]

    eng = ScriptedEngine(lambda r: "ok " + r.request_id, delay=slow, capacity=8)
    _run(eng, _seeds(4), mode="lockstep", batch_size=4)
    first_slow_end = eng.log.index(("end", "answer:s0:0"))
    assert all(not e[1].endswith((":1", ":2", ":3")) for e in eng.log[:first_slow_end])


def test_scheduler_keeps_max_chains_in_flight_and_outputs_match_lockstep() -> None:
    eng = ScriptedEngine(lambda r: "ok " + r.request_id, delay=lambda r: 0.001, capacity=3)
    settings = ChainSettings.build(EvolutionConfig(), rounds=2, seed=0, answer=Sampling())
    sched = ChainScheduler(eng, settings, max_chains=5)
    peak = 0

    def done(_c: object) -> None:
        nonlocal peak
        peak = max(peak, sched.stats.chains_in_flight)

    asyncio.run(sched.run(_seeds(20), done))
    assert sched.stats.chains_done == 20 and peak == 5 and sched.stats.in_flight == 0
    key = lambda r: r["seed_id"]  # noqa: E731
    a = sorted(_run(ScriptedEngine(lambda r: "x" + r.request_id), _seeds(9)), key=key)
    b = sorted(_run(ScriptedEngine(lambda r: "x" + r.request_id), _seeds(9), mode="lockstep",
                    batch_size=4), key=key)
    assert a == b  # scheduling changes timing, never content


def test_unused_operations_come_first() -> None:
    for i in range(30):
        used = ("seed", "deepen", "concretize")
        step = pick_step(["deepen", "concretize", "add_reasoning_step"], [], 0, f"s{i}", 3, used)
        assert step.operation == "add_reasoning_step"


def test_pair_prompt_carries_the_system_prompt_the_answer_was_generated_with() -> None:
    pairs, _ = build_pairs(_chain(["R0", "R1"]), system_prompt="Be brief.")
    assert pairs[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "I1"}]
    eng = ScriptedEngine(lambda r: "ok")
    settings = ChainSettings.build(EvolutionConfig(), rounds=1, seed=0, answer=Sampling(),
                                   system_prompt="Be brief.")
    asyncio.run(ChainScheduler(eng, settings).run(_seeds(1), lambda c: None))
    assert all(r.messages[0] == {"role": "system", "content": "Be brief."} for r in eng.seen)


def _teacher_chain(rounds: int = 1) -> Chain:
    """A teacher-mode chain whose seed comes with its answer, so it asks for a rewrite first."""
    settings = ChainSettings.build(EvolutionConfig(mode="teacher", operations=["add_requirement"]),
                                   rounds=rounds, seed=0, answer=Sampling())
    return Chain({"seed_id": "t", "source": "f:1", "instruction": "Describe the water cycle.",
                  "response": "Water evaporates, condenses and falls."}, settings)


def _rewrite(chain: Chain, text: str) -> None:
    pending = chain.next_request()
    assert pending is not None and pending.role == "evolve"
    chain.apply(GenerationResult(text, 50, 20, "stop"))


def test_teacher_rewrite_that_drops_the_requirement_is_rejected() -> None:
    chain = _teacher_chain()
    _rewrite(chain, "Describe the water cycle in a way a ten-year-old would enjoy.")
    assert len(chain.levels) == 1 and chain.next_request() is None
    assert chain.stop_reason == "evolve:requirement_not_stated"
    assert chain.attempts == [{
        "level": 1, "operation": "add_requirement", "reason": "requirement_not_stated",
        "candidate": "Describe the water cycle in a way a ten-year-old would enjoy."}]
    row = chain.to_row()
    assert row["num_levels"] == 1 and row["levels"][0]["level"] == 0
    [reject] = chain_rejects(row)
    assert (reject["stage"], reject["reason"], reject["level"]) == \
        ("evolve", "requirement_not_stated", 1)


def test_teacher_rewrite_that_states_the_requirement_is_accepted() -> None:
    chain = _teacher_chain()
    step = pick_step(["add_requirement"], [], 0, "t", 1, ("seed",))
    assert step.requirement_id is not None
    _rewrite(chain, f"Describe the water cycle for a ten-year-old. {step.directive}")
    assert chain.attempts == [] and chain.stop_reason is None
    assert [r["id"] for r in chain.levels[1]["requirements"]] == [step.requirement_id]
    assert chain.next_request().role == "answer"  # type: ignore[union-attr]


def test_teacher_rewrite_must_keep_the_inherited_requirements() -> None:
    """Level 2 records level 1's requirement too, so a rewrite that drops it is rejected."""
    chain = _teacher_chain(rounds=2)
    first = _directive(chain.next_request().request.messages[-1]["content"])  # type: ignore
    _rewrite(chain, f"Describe the water cycle. {first}")
    chain.next_request()
    chain.apply(GenerationResult("An answer.", 5, 7, "stop"))
    second = _directive(chain.next_request().request.messages[-1]["content"])  # type: ignore
    _rewrite(chain, f"Describe the water cycle. {second}")  # drops the first requirement
    assert [lvl["level"] for lvl in chain.levels] == [0, 1]
    assert chain.stop_reason == "evolve:requirement_not_stated"
    assert chain.attempts[0]["level"] == 2
    assert unstated_requirement(f"Describe the water cycle. {first} {second}",
                                chain.levels[1]["requirements"]) is None


def test_unstated_requirement_names_the_requirement_and_what_is_missing() -> None:
    reqs = [{"id": "detectable_format:number_bullet_lists", "kwargs_json": '{"num_bullets": 3}',
             "level": 1, "text": "Use exactly 3 bullet points."}]
    assert unstated_requirement("List fruits in exactly 3 bullet points.", reqs) is None
    problem = unstated_requirement("List fruits in exactly 4 bullet points.", reqs)
    assert problem is not None and problem.startswith("detectable_format:number_bullet_lists: ")


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_template_instructions_state_every_requirement_they_stack(seed: int) -> None:
    """Template mode appends one phrasing per level; the stacked text states all of them."""
    text, reqs = "Describe the water cycle.", []
    for level in range(1, 9):
        present = [r["id"] for r in reqs]
        if not compatible_types(present):
            break
        step = pick_step(["add_requirement", "change_format"], present, seed, "x", level)
        text = f"{text} {step.directive}"
        reqs.append({"id": step.requirement_id, "kwargs_json": json.dumps(step.kwargs)})
        assert unstated_requirement(text, reqs) is None, text
