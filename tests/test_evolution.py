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
from ecd_ray.evolution import Chain, ChainSettings, eliminate, pick_step, unstated_requirement
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
