"""APC and the pairing rules: rank pairs, the filter, mixing, truncation, regeneration.

Chains are driven through the real Chain / ChainScheduler with scripted engines (chain logic
only; real engines run in test_pipeline.py); pairs are built by the real pair builder and
checked against expectations computed here by hand.
"""

from __future__ import annotations

import asyncio
import json
import math

import pyarrow as pa
import pytest
from test_evolution import ScriptedEngine, _seeds

from ecd_ray import schema
from ecd_ray.config import ConfigError, EvolutionConfig, load_config
from ecd_ray.engines.base import GenerationResult, Sampling
from ecd_ray.evolution import ChainSettings, ResponderSpec, apc_prompt
from ecd_ray.pairs import build_pairs, rank_pairs
from ecd_ray.scheduler import ChainScheduler
from ecd_ray.verify import annotate_levels


def test_rank_pairs_which_pairs_are_formed() -> None:
    assert rank_pairs([3, 1, 2], "adjacent") == [(3, 2), (2, 1)]
    assert rank_pairs([3, 1, 2], "extremes") == [(3, 1)]
    assert rank_pairs([3, 1, 2], "all") == [(3, 2), (3, 1), (2, 1)]
    assert rank_pairs([2, 2], "all") == []  # one rank: nothing to contrast
    assert rank_pairs([5, 5, 1], "adjacent") == [(5, 1)]
    with pytest.raises(ValueError, match="unknown rank_pairs"):
        rank_pairs([1, 2], "best")


def _level(k: int, response: str, responses: list[tuple[str, int, str, str]], *,
           requirements: list[dict] | None = None, apc: bool = True,
           finish: str = "stop") -> dict:
    return {"level": k, "instruction": f"I{k}", "operation": "seed" if k == 0 else "deepen",
            "requirements": requirements or [], "response": response, "model": "teacher-m",
            "prompt_tokens": 3, "completion_tokens": 4, "finish_reason": finish, "apc": apc,
            "responses": [{"responder": n, "rank": r, "model": f"{n}-m", "response": t,
                           "prompt_tokens": 3, "completion_tokens": 4, "finish_reason": f}
                          for n, r, t, f in responses]}


def _chain(levels: list[dict]) -> dict:
    return annotate_levels({"seed_id": "s", "source": "f:1", "levels": levels,
                            "stop_reason": "completed", "rejected_attempts": []})


LOWER = [{"id": "change_case:english_lowercase", "kwargs_json": "{}", "level": 1,
          "text": "Use only lowercase letters."}]
TEACHER = {"name": "teacher", "rank": 3}


def _formed(pairs: list[dict]) -> list[tuple[int, int, int]]:
    return [(p["chosen_level"], p["chosen_rank"], p["rejected_rank"]) for p in pairs]


def test_apc_pairs_use_the_teacher_and_responders_by_rank() -> None:
    chain = _chain([_level(0, "teacher answer", [("mid", 2, "mid answer", "stop"),
                                                 ("weak", 1, "weak answer", "stop")])])
    for how, want in (("adjacent", [(0, 3, 2), (0, 2, 1)]), ("extremes", [(0, 3, 1)]),
                      ("all", [(0, 3, 2), (0, 3, 1), (0, 2, 1)])):
        pairs, _ = build_pairs(chain, teacher=TEACHER, rank_pairs_how=how)
        assert _formed(pairs) == want, how
        for p in pairs:
            assert p["strategy"] == "apc" and p["chosen_level"] == p["rejected_level"] == 0
    pairs, _ = build_pairs(chain, teacher=TEACHER, rank_pairs_how="extremes")
    assert pairs[0]["chosen"][0]["content"] == "teacher answer"
    assert pairs[0]["rejected"][0]["content"] == "weak answer"
    assert pairs[0]["chosen_model"] == "teacher-m" and pairs[0]["rejected_model"] == "weak-m"
    # without a from_teacher responder, the teacher's answer is not an APC side
    pairs, _ = build_pairs(chain, teacher=None, rank_pairs_how="all")
    assert _formed(pairs) == [(0, 2, 1)]


def test_apc_filter_drops_a_pair_whose_weaker_side_is_better() -> None:
    lvl = _level(1, "Teacher Answer In Capitals", [("weak", 1, "a lowercase answer", "stop")],
                 requirements=LOWER)
    chain = _chain([_level(0, "r0", [], apc=False), lvl])
    pairs, rejects = build_pairs(chain, teacher=TEACHER, apc_filter="checkers")
    assert pairs == []
    assert [r["reason"] for r in rejects] == ["weaker_side_better", "no_pairs"]
    assert "misses 0" in rejects[0]["detail"] and "stronger 1" in rejects[0]["detail"]
    # filter off: the pair is formed (and the pair policy then judges the chosen side)
    pairs, rejects = build_pairs(chain, teacher=TEACHER, apc_filter="none", policy="all")
    assert _formed(pairs) == [(1, 3, 1)] and pairs[0]["chosen_missed"] == 1
    pairs, rejects = build_pairs(chain, teacher=TEACHER, apc_filter="none",
                                 policy="chosen_passes")
    assert pairs == [] and rejects[0]["reason"] == "chosen_fails_requirements"
    # the filter keeps a pair where the stronger side is at least as good
    lvl = _level(1, "all lowercase here", [("weak", 1, "Capitals Here", "stop")],
                 requirements=LOWER)
    pairs, _ = build_pairs(_chain([_level(0, "r0", [], apc=False), lvl]), teacher=TEACHER)
    assert _formed(pairs) == [(1, 3, 1)] and pairs[0]["hard_negative_verified"]


def test_identical_apc_answers_are_refused() -> None:
    chain = _chain([_level(0, "same", [("weak", 1, "same", "stop")])])
    pairs, rejects = build_pairs(chain, teacher=TEACHER)
    assert pairs == [] and rejects[0]["reason"] == "identical_responses"


def test_a_truncated_chosen_answer_never_reaches_pairs() -> None:
    # ECD: R1 cut at its limit
    levels = [_level(0, "R0", [], apc=False), _level(1, "R1 cut", [], apc=False,
                                                    finish="length"),
              _level(2, "R2", [], apc=False)]
    pairs, rejects = build_pairs(_chain(levels), policy="all")
    assert [(p["chosen_level"], p["rejected_level"]) for p in pairs] == [(2, 1)]
    assert pairs[0]["rejected_truncated"] is True  # a cut rejected side is kept and flagged
    assert [r["reason"] for r in rejects] == ["chosen_truncated"]
    pairs, _ = build_pairs(_chain(levels), policy="all", truncated_chosen="keep")
    assert len(pairs) == 2
    # APC: the stronger responder cut
    chain = _chain([_level(0, "teacher cut", [("weak", 1, "weak", "stop")], finish="length")])
    pairs, rejects = build_pairs(chain, teacher=TEACHER)
    assert pairs == [] and rejects[0]["reason"] == "chosen_truncated"


def test_pairs_carry_difficulty_and_stage() -> None:
    levels = [_level(0, "R0", [], apc=False), _level(1, "R1", [], apc=False),
              _level(2, "R2", [("weak", 1, "W2", "stop")], apc=True)]
    pairs, _ = build_pairs(_chain(levels), teacher=TEACHER, policy="all")
    by = {p["strategy"]: p for p in pairs}
    assert by["ecd"]["difficulty"] == 1.0 and by["ecd"]["stage"] == 2  # gap 1, no reqs
    assert by["apc"]["difficulty"] == pytest.approx(0.5) and by["apc"]["stage"] == 1  # gap 2
    pa.Table.from_pylist(pairs, schema=schema.PAIRS)  # the rows fit the schema


def test_mixing_ratio_is_honoured() -> None:
    n = 4000
    for fraction in (0.0, 0.25, 0.5, 1.0):
        picked = sum(apc_prompt("mixed", fraction, 0, f"s{i}", 1 + i % 3) for i in range(n))
        sd = math.sqrt(n * fraction * (1 - fraction))
        assert abs(picked - n * fraction) <= 4 * sd + 1e-9, (fraction, picked)
    assert not any(apc_prompt("mixed", 1.0, 0, f"s{i}", 0) for i in range(50))  # level 0
    assert all(apc_prompt("apc", 0.0, 0, f"s{i}", k) for i in range(20) for k in range(3))
    assert not any(apc_prompt("ecd", 1.0, 0, f"s{i}", 2) for i in range(20))
    # stable: the same (seed, seed id, level) is assigned the same way on a resumed run
    assert [apc_prompt("mixed", 0.5, 7, f"s{i}", 2) for i in range(100)] == \
        [apc_prompt("mixed", 0.5, 7, f"s{i}", 2) for i in range(100)]


def _run_apc(strategy: str, fraction: float, n: int = 60, rounds: int = 3, weak=None,
             regenerate: int | None = None, teacher_answer=None) -> tuple[list, ScriptedEngine]:
    teacher = ScriptedEngine(teacher_answer or (lambda r: f"teacher says {r.request_id}"))
    weak_engine = ScriptedEngine(weak or (lambda r: f"weak says {r.request_id}"))
    specs = (ResponderSpec("teacher", 2, "scripted", Sampling(), from_teacher=True),
             ResponderSpec("weak", 1, "weak-m", Sampling(max_new_tokens=9)))
    settings = ChainSettings.build(EvolutionConfig(operations=["deepen"]), rounds=rounds,
                                   seed=0, answer=Sampling(), strategy=strategy,
                                   responders=specs, apc_fraction=fraction,
                                   regenerate_max_new_tokens=regenerate)
    rows: list[dict] = []
    sched = ChainScheduler(teacher, settings, responders={"weak": weak_engine})
    asyncio.run(sched.run(_seeds(n), lambda c: rows.append(annotate_levels(c.to_row()))))
    return rows, weak_engine


def test_mixed_run_writes_both_strategies_in_the_configured_ratio() -> None:
    rows, weak = _run_apc("mixed", 0.25, n=120)
    pairs = [p for row in rows for p in build_pairs(row, teacher={"name": "teacher",
                                                                  "rank": 2})[0]]
    # every level 1..3 gives exactly one pair (gap 1 ECD, or teacher > weak APC)
    assert len(pairs) == 120 * 3
    apc = [p for p in pairs if p["strategy"] == "apc"]
    expect = sum(apc_prompt("mixed", 0.25, 0, f"s{i}", k) for i in range(120)
                 for k in (1, 2, 3))
    assert len(apc) == expect and abs(expect / 360 - 0.25) < 0.08
    # the weak responder was asked exactly the APC levels, with its own sampling
    assert len(weak.seen) == expect
    assert all(r.sampling.max_new_tokens == 9 for r in weak.seen)
    assert all(r.request_id.startswith("respond:weak:") for r in weak.seen)
    # APC pairs are the teacher's answer over the weak one, for the same prompt
    for p in apc:
        assert p["chosen"][0]["content"].startswith("teacher says answer:")
        assert p["rejected"][0]["content"].startswith("weak says respond:weak:")
    table = pa.Table.from_pylist(pairs, schema=schema.PAIRS)
    assert set(table.column("strategy").to_pylist()) == {"ecd", "apc"}


def test_apc_only_run_on_seeds() -> None:
    rows, weak = _run_apc("apc", 0.0, n=10, rounds=0)
    assert all(len(r["levels"]) == 1 for r in rows) and len(weak.seen) == 10
    pairs = [p for row in rows for p in build_pairs(row, teacher={"name": "teacher",
                                                                  "rank": 2})[0]]
    assert len(pairs) == 10 and {p["strategy"] for p in pairs} == {"apc"}


def test_a_failed_responder_costs_only_its_pairs() -> None:
    def weak(r):
        if r.request_id.endswith(":2"):
            return GenerationResult("", 0, 0, "error", error="boom", error_code="engine_error")
        return f"weak {r.request_id}"
    rows, _ = _run_apc("apc", 0.0, n=3, weak=weak)
    for row in rows:
        assert row["num_levels"] == 4 and row["stop_reason"] == "completed"
        failed = [a for a in row["rejected_attempts"] if a["operation"] == "respond:weak"]
        assert [a["level"] for a in failed] == [2] and failed[0]["reason"] == "engine_error"
        pairs, rejects = build_pairs(row, teacher={"name": "teacher", "rank": 2})
        assert sorted(p["chosen_level"] for p in pairs) == [0, 1, 3]
        assert any(r["stage"] == "respond" and r["reason"] == "engine_error" for r in rejects)


def test_truncated_teacher_answer_is_regenerated_with_a_larger_budget() -> None:
    def teacher(r):
        if r.request_id.endswith(":regenerate"):
            return GenerationResult("a full answer", 5, 30, "stop")
        if r.request_id.endswith(":1"):
            return GenerationResult("a cut ans", 5, 10, "length")
        return GenerationResult(f"fine {r.request_id}", 5, 7, "stop")
    teacher_engine = ScriptedEngine(teacher)
    settings = ChainSettings.build(EvolutionConfig(operations=["deepen"]), rounds=2, seed=0,
                                   answer=Sampling(max_new_tokens=10),
                                   regenerate_max_new_tokens=40)
    rows: list[dict] = []
    asyncio.run(ChainScheduler(teacher_engine, settings).run(
        _seeds(2), lambda c: rows.append(annotate_levels(c.to_row()))))
    regen = [r for r in teacher_engine.seen if r.request_id.endswith(":regenerate")]
    assert len(regen) == 2 and all(r.sampling.max_new_tokens == 40 for r in regen)
    for row in rows:
        assert row["levels"][1]["response"] == "a full answer"
        assert row["levels"][1]["finish_reason"] == "stop"
        assert [a["reason"] for a in row["rejected_attempts"]] == ["truncated_regenerated"]
        pairs, _ = build_pairs(row, policy="all")
        assert len(pairs) == 2  # R1 > R0 is no longer refused as chosen_truncated
    # a second cut is kept as cut, and the pair is then refused
    settings = ChainSettings.build(EvolutionConfig(operations=["deepen"]), rounds=1, seed=0,
                                   answer=Sampling(max_new_tokens=10),
                                   regenerate_max_new_tokens=40)
    eng = ScriptedEngine(lambda r: GenerationResult(f"cut {r.request_id}", 5, 10, "length"))
    rows = []
    asyncio.run(ChainScheduler(eng, settings).run(
        _seeds(1), lambda c: rows.append(annotate_levels(c.to_row()))))
    pairs, rejects = build_pairs(rows[0], policy="all")
    assert pairs == [] and "chosen_truncated" in [r["reason"] for r in rejects]


def test_apc_config_validation() -> None:
    cfg = load_config(None, ["strategy=mixed", "apc.fraction=0.3"])
    assert [r.name for r in cfg.responders()] == ["teacher", "gemma3-270m"]
    assert load_config(None, []).responders() == []
    with pytest.raises(ConfigError, match="two responders of different rank"):
        load_config(None, ["strategy=apc", "apc.responders=[{name: a, rank: 1}, "
                           "{name: b, rank: 1}]"])
    with pytest.raises(ConfigError, match="rounds >= 1"):
        load_config(None, ["strategy=mixed", "rounds=0"])
    assert load_config(None, ["strategy=apc", "rounds=0"]).rounds == 0
    with pytest.raises(ConfigError, match="ascending"):
        load_config(None, ["pairs.stage_edges=[0.8, 0.5]"])
    assert json.loads(json.dumps(cfg.model_dump()))["apc"]["fraction"] == 0.3
    # A responder's or the judge's model is checked before any actor starts; ECD ignores them.
    bad = ["apc.responders=[{name: t, rank: 2, from_teacher: true}, "
           "{name: w, rank: 1, model: /no/such/model}]", "apc.judge={model: /no/judge}"]
    with pytest.raises(ConfigError) as err:
        load_config(None, ["strategy=apc", *bad])
    assert "'apc.responders[1].model': '/no/such/model' is neither" in str(err.value)
    assert "'apc.judge.model': '/no/judge' is neither" in str(err.value)
    assert load_config(None, ["strategy=ecd", *bad]).strategy == "ecd"
    served = ["apc.responders=[{name: t, rank: 2, from_teacher: true}, {name: w, rank: 1, "
              "engine: openai, model: served-name}]"]
    assert load_config(None, ["strategy=apc", *served]).responders()[1].model == "served-name"
    # A misplaced key inside a list item names the keys valid there.
    with pytest.raises(ConfigError, match=r"unknown key 'apc.responders.1.base_url' \(valid "
                       r"keys here: .*\bopenai\b.*\bfrom_teacher\b"):
        load_config(None, ["strategy=apc", "apc.responders=[{name: t, rank: 2, from_teacher: "
                           "true}, {name: w, rank: 1, base_url: 'http://127.0.0.1:8000/v1'}]"])


def test_judge_verdicts_filter_pairs_and_positions_are_balanced() -> None:
    from ecd_ray.evolution import JUDGE_TEMPLATE, judge_positions, judge_verdict

    assert judge_verdict("B") == "B" and judge_verdict(" A.") == "A"
    assert judge_verdict("Answer B is better") == "B" and judge_verdict("neither") is None
    firsts = [judge_positions(0, f"s{i}", 1, "teacher", "weak") for i in range(400)]
    assert 150 < sum(firsts) < 250  # the stronger answer is A about half the time

    seen: list = []

    def judge(r):  # a judge that always prefers the weak answer, wherever it is shown
        seen.append(r)
        text = r.messages[0]["content"]
        a = text.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
        return "A" if a.startswith("weak") else "B"
    teacher = ScriptedEngine(lambda r: f"teacher says {r.request_id}")
    weak = ScriptedEngine(lambda r: f"weak says {r.request_id}")
    judge_engine = ScriptedEngine(judge)
    specs = (ResponderSpec("teacher", 2, "scripted", Sampling(), from_teacher=True),
             ResponderSpec("weak", 1, "weak-m", Sampling()))
    settings = ChainSettings.build(EvolutionConfig(operations=["deepen"]), rounds=1, seed=0,
                                   answer=Sampling(), strategy="apc", responders=specs,
                                   judge=Sampling(temperature=0.0, max_new_tokens=8))
    rows: list[dict] = []
    asyncio.run(ChainScheduler(teacher, settings, responders={"weak": weak},
                               judge=judge_engine).run(
        _seeds(20), lambda c: rows.append(annotate_levels(c.to_row()))))
    assert len(seen) == 40  # one verdict per APC pair: 20 seeds x 2 levels
    assert seen[0].messages[0]["content"].startswith(JUDGE_TEMPLATE.split("\n")[0])
    for row in rows:
        for lvl in row["levels"]:
            assert [(j["chosen"], j["rejected"], j["verdict"]) for j in lvl["judgements"]] \
                == [("teacher", "weak", "rejected")]
        pairs, rejects = build_pairs(row, teacher={"name": "teacher", "rank": 2},
                                     apc_filter="judge")
        assert pairs == [] and [r["reason"] for r in rejects][:2] == \
            ["judge_prefers_weaker"] * 2
        pairs, _ = build_pairs(row, teacher={"name": "teacher", "rank": 2}, apc_filter="none")
        assert len(pairs) == 2  # without the judge filter the verdicts are ignored
    pa.Table.from_pylist(rows, schema=schema.EVOLUTIONS.remove(
        schema.EVOLUTIONS.get_field_index("worker")))
