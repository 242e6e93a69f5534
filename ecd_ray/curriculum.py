"""Difficulty and curriculum stage of a preference pair (plain Python, no Ray).

Every pair gets ``difficulty`` in (0, 1] (higher = harder to tell chosen from rejected) and a
``stage`` (0 = easiest, trained first when the curriculum is on). The rule is the mean of the
terms that apply to the pair:

* **gap** — ECD: ``1 / (chosen_level - rejected_level)``. R(k-1) is the hard negative of Ik
  (gap 1, term 1.0); R(k-2) misses more of Ik's requirements (gap 2, term 0.5), and so on.
  APC: ``1 / (chosen_rank - rejected_rank)``. Neighbouring ranks (gap 1) are hard; a strong
  model against a much weaker one is easy (APC, Xu et al. 2023, section 3.3).
* **missed** — when the prompt has checkable requirements: ``1 / (1 + rejected_missed)``. A
  rejected answer that meets every requirement of the chosen level (0 missed, term 1.0)
  differs from the chosen one only in ways no program checks: the hardest contrast. Each
  requirement it misses makes the contrast easier to see.

``stage`` is the number of ``edges`` (ascending thresholds) that ``difficulty`` reaches: with
the default edges ``(0.5, 0.8)`` a pair below 0.5 is stage 0, one in [0.5, 0.8) stage 1, the
rest stage 2. So with the default ECD pairs (gap 1): a negative that misses one requirement
(0.75) is stage 1, one that misses none (1.0) stage 2, a gap-2 negative that misses two
(0.42) stage 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_EDGES: tuple[float, ...] = (0.5, 0.8)


def difficulty(pair: Mapping[str, Any]) -> float:
    """The difficulty of a PAIRS row (needs ``strategy``, the levels or ranks, ``requirements``
    and ``rejected_missed``)."""
    if pair["strategy"] == "apc":
        gap = int(pair["chosen_rank"]) - int(pair["rejected_rank"])
    else:
        gap = int(pair["chosen_level"]) - int(pair["rejected_level"])
    if gap < 1:
        raise ValueError(f"pair {pair.get('pair_id')}: the chosen side must be the higher "
                         f"level or rank (gap {gap})")
    terms = [1.0 / gap]
    if pair.get("requirements"):
        terms.append(1.0 / (1 + int(pair["rejected_missed"])))
    return sum(terms) / len(terms)


def stage(value: float, edges: Sequence[float] = DEFAULT_EDGES) -> int:
    """The curriculum stage of a difficulty: how many of the ascending ``edges`` it reaches."""
    return sum(1 for e in edges if value >= e)


def annotate(pair: dict[str, Any], edges: Sequence[float] = DEFAULT_EDGES) -> dict[str, Any]:
    """Set ``difficulty`` and ``stage`` on a PAIRS row (in place) and return it."""
    d = difficulty(pair)
    pair["difficulty"] = round(d, 6)
    pair["stage"] = stage(d, edges)
    return pair
