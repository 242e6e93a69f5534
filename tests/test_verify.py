"""The verify stage and the pair policy on hand-built chains (plain Python)."""

from __future__ import annotations

import json

import pytest

from ecd_ray.pairs import build_pairs, is_heldout
from ecd_ray.verify import annotate_levels, pair_verification

NO_COMMA = {"id": "punctuation:no_comma", "kwargs_json": "{}", "level": 1,
            "text": "Do not use any commas."}
LOWER = {"id": "change_case:english_lowercase", "kwargs_json": "{}", "level": 2,
         "text": "Write in lowercase."}
WORDS = {"id": "length_constraints:number_words",
         "kwargs_json": json.dumps({"relation": "less than", "num_words": 12}), "level": 2,
         "text": "Fewer than 12 words."}


def chain(responses: list[str], requirements: list[list[dict]]) -> dict:
    levels = [{"level": i, "instruction": f"I{i}", "operation": "seed" if i == 0 else "x",
               "requirements": reqs, "response": r, "model": "m", "finish_reason": "stop"}
              for i, (r, reqs) in enumerate(zip(responses, requirements, strict=True))]
    return annotate_levels({"seed_id": "s", "source": "f:1", "levels": levels,
                            "stop_reason": "completed", "rejected_attempts": []})


def test_levels_are_checked_against_their_own_requirements() -> None:
    c = chain(["Hi, there.", "Hi there.", "Hi, There."], [[], [NO_COMMA], [NO_COMMA, LOWER]])
    assert [lvl["passes"] for lvl in c["levels"]] == [[], [True], [False, False]]


def test_verified_hard_negative() -> None:
    c = chain(["Yes, it works.", "yes it works"], [[], [NO_COMMA]])
    v = pair_verification(c["levels"][1], c["levels"][0])
    assert v == {"chosen_passes": [True], "rejected_passes": [False], "chosen_missed": 0,
                 "rejected_missed": 1, "hard_negative_verified": True}


def test_rejected_side_counts_every_missed_requirement() -> None:
    # (english_lowercase also needs langdetect to read the text as English, as in IFEval)
    c = chain(["Cats, dogs, and birds.",
               "the cats and the dogs are very good pets for the whole family",
               "they are the best friends that we have in this house"],
              [[], [NO_COMMA], [NO_COMMA, LOWER, WORDS]])
    v = pair_verification(c["levels"][2], c["levels"][0])
    assert v["chosen_passes"] == [True, True, True]
    assert v["rejected_passes"] == [False, False, True]
    assert v["rejected_missed"] == 2 and v["hard_negative_verified"]


@pytest.mark.parametrize(("policy", "kept", "reasons"), [
    ("all", [(1, 0), (2, 1)], []),
    ("chosen_passes", [(1, 0)], ["chosen_fails_requirements"]),
    ("verified", [], ["negative_not_verified", "chosen_fails_requirements", "no_pairs"]),
])
def test_pair_policy(policy: str, kept: list[tuple[int, int]], reasons: list[str]) -> None:
    # Level 1: both answers meet "no comma" -> not a verified negative.
    # Level 2: the chosen answer has a capital letter -> fails its own requirement.
    c = chain(["no commas here", "still none", "Capital here"], [[], [NO_COMMA],
                                                                 [NO_COMMA, LOWER]])
    pairs, rejects = build_pairs(c, policy=policy)
    assert [(p["chosen_level"], p["rejected_level"]) for p in pairs] == kept
    assert [r["reason"] for r in rejects] == reasons
    for r in rejects:
        if r["reason"] != "no_pairs":
            assert f"pairs.policy={policy}" in r["detail"]


def test_heldout_split_is_stable_and_near_the_fraction() -> None:
    ids = [f"seed-{i}" for i in range(4000)]
    held = [i for i in ids if is_heldout(i, 0.1, 0)]
    assert held == [i for i in ids if is_heldout(i, 0.1, 0)]
    assert 300 < len(held) < 500
    assert not any(is_heldout(i, 0.0, 0) for i in ids[:100])
