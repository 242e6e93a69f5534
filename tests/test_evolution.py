"""Evolution steps, the eliminator, and the ECD pairing rule (plain Python, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from ecd_ray.config import EVOLUTION_OPERATIONS, EvolutionConfig
from ecd_ray.constraints.catalogue import CATALOGUE, conflicts
from ecd_ray.engines.base import ChatRequest, GenerationResult, Sampling
from ecd_ray.evolution import ChainRunner, eliminate, pick_step
from ecd_ray.pairs import build_pairs
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
    """An engine whose answers are given by a function: stands in for a teacher LLM in
    chain-logic tests only (the real engines are exercised in test_pipeline.py)."""

    answer: object
    model_name: str = "scripted"
    seen: list[ChatRequest] = field(default_factory=list)

    def generate(self, requests: list[ChatRequest]) -> list[GenerationResult]:
        self.seen += requests
        return [GenerationResult(self.answer(r), 5, 7, "stop") for r in requests]  # type: ignore[operator]

    def close(self) -> None:
        pass


def test_chain_runner_template_mode_levels_and_inheritance() -> None:
    eng = ScriptedEngine(lambda r: f"answer to: {r.messages[-1]['content'][-30:]}")
    runner = ChainRunner(eng, EvolutionConfig(operations=["add_requirement"]), rounds=3, seed=0,
                         answer=Sampling())
    rows = runner.run([{"seed_id": "a", "source": "f:1", "instruction": "Describe a cat.",
                        "response": None},
                       {"seed_id": "b", "source": "f:2", "instruction": "Describe a dog.",
                        "response": "A dog is a loyal animal."}])
    a, b = rows
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


def test_chain_runner_teacher_mode_rejects_meta_text_and_keeps_earlier_levels() -> None:
    def teacher(req: ChatRequest) -> str:
        text = req.messages[-1]["content"]
        if "instruction rewriter" in text:
            return "Rewritten prompt: do it" if "evolve:bad:2" == req.request_id else \
                text.rsplit("\n", 1)[-1] + " Use exactly three sentences."
        return "an answer " + req.request_id

    eng = ScriptedEngine(teacher)
    runner = ChainRunner(eng, EvolutionConfig(mode="teacher"), rounds=3, seed=0,
                         answer=Sampling())
    (good, bad) = runner.run([
        {"seed_id": "good", "source": "f:1", "instruction": "Name a color.", "response": None},
        {"seed_id": "bad", "source": "f:2", "instruction": "Name a fruit.", "response": None},
    ])
    assert good["num_levels"] == 4
    assert bad["num_levels"] == 2 and bad["stop_reason"] == "evolve:meta_text"
    assert bad["rejected_attempts"][0]["level"] == 2


def test_unused_operations_come_first() -> None:
    for i in range(30):
        used = ("seed", "deepen", "concretize")
        step = pick_step(["deepen", "concretize", "add_reasoning_step"], [], 0, f"s{i}", 3, used)
        assert step.operation == "add_reasoning_step"
