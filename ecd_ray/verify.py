"""Verification of answers against recorded requirements (plain Python, no Ray).

Every level's answer is checked against every requirement in force at that level; a pair's
rejected answer R(j) is checked against the requirements of the chosen level k. A pair's
negative is a *verified hard negative* when the chosen answer meets all of level k's checkable
requirements and the rejected answer misses at least one.
"""

from __future__ import annotations

import json
from typing import Any

from ecd_ray.constraints import check_loose, check_strict

PAIR_POLICIES = ("all", "chosen_passes", "verified")


def check_all(response: str, requirements: list[dict[str, Any]]) -> tuple[list[bool], list[bool]]:
    """Strict and loose pass/fail of ``response`` for each requirement, in order."""
    strict, loose = [], []
    for req in requirements:
        kwargs = json.loads(req["kwargs_json"] or "{}")
        strict.append(check_strict(req["id"], response, kwargs))
        loose.append(check_loose(req["id"], response, kwargs))
    return strict, loose


def annotate_levels(chain: dict[str, Any]) -> dict[str, Any]:
    """Add ``passes`` / ``passes_loose`` to each level of an EVOLUTIONS row (in place)."""
    for lvl in chain["levels"]:
        lvl["passes"], lvl["passes_loose"] = check_all(lvl["response"], lvl["requirements"])
    return chain


def pair_verification(chosen: dict[str, Any], rejected: dict[str, Any]) -> dict[str, Any]:
    """The measurement columns of a pair whose chosen level is ``chosen``."""
    rejected_passes, _ = check_all(rejected["response"], chosen["requirements"])
    return verification_columns(list(chosen["passes"]), rejected_passes)


def verification_columns(chosen_passes: list[bool], rejected_passes: list[bool]
                         ) -> dict[str, Any]:
    """A pair's measurement columns from each side's strict pass/fail per requirement."""
    chosen_missed = chosen_passes.count(False)
    rejected_missed = rejected_passes.count(False)
    return {
        "chosen_passes": chosen_passes,
        "rejected_passes": rejected_passes,
        "chosen_missed": chosen_missed,
        "rejected_missed": rejected_missed,
        "hard_negative_verified": chosen_missed == 0 and rejected_missed > 0,
    }


def policy_reason(pair: dict[str, Any], policy: str) -> str | None:
    """Why ``policy`` keeps ``pair`` out of ``pairs/`` (a reject reason), or None to keep it."""
    if policy == "all":
        return None
    if pair["chosen_missed"] > 0:
        return "chosen_fails_requirements"
    if policy == "verified" and not pair["hard_negative_verified"]:
        return "negative_not_verified"
    return None
