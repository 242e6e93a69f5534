"""Confidence intervals for instruction-following accuracies (numpy, no Ray).

Prompts are the unit of sampling: a prompt's requirements are not independent (one rambling
answer misses several), so every interval resamples whole prompts (a percentile bootstrap).
``paired_difference`` resamples the same prompts for two models, which is what decides
whether one beats the other: the two models' answers to one prompt are correlated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

METRICS = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict",
           "instruction_level_loose")


def _arrays(details: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per prompt: passed (all strict/loose), requirements, requirements met."""
    return {
        "n": np.array([len(d["strict"]) for d in details], dtype=np.float64),
        "strict": np.array([sum(d["strict"]) for d in details], dtype=np.float64),
        "loose": np.array([sum(d["loose"]) for d in details], dtype=np.float64),
        "all_strict": np.array([all(d["strict"]) for d in details], dtype=np.float64),
        "all_loose": np.array([all(d["loose"]) for d in details], dtype=np.float64),
    }


def _metric(a: dict[str, np.ndarray], name: str, idx: np.ndarray) -> np.ndarray:
    """``name`` for each row of resampled prompt indices ``idx`` (shape boots x prompts)."""
    kind = "strict" if name.endswith("strict") else "loose"
    if name.startswith("prompt"):
        return a[f"all_{kind}"][idx].mean(axis=-1)
    return a[kind][idx].sum(axis=-1) / np.maximum(a["n"][idx].sum(axis=-1), 1)


def _indices(n: int, boots: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(boots, n))


def intervals(details: Sequence[dict[str, Any]], *, boots: int = 2000, seed: int = 0,
              level: float = 0.95) -> dict[str, dict[str, float]]:
    """Each metric's point value and ``level`` percentile-bootstrap interval over prompts."""
    a = _arrays(details)
    n = len(details)
    idx = _indices(n, boots, seed)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    out = {}
    for m in METRICS:
        dist = _metric(a, m, idx)
        out[m] = {"value": float(_metric(a, m, np.arange(n))), "lo": float(np.quantile(dist, lo_q)),
                  "hi": float(np.quantile(dist, hi_q))}
    return out


def paired_difference(base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], *,
                      boots: int = 2000, seed: int = 0, level: float = 0.95,
                      ) -> dict[str, dict[str, float]]:
    """``other - base`` for each metric on the same prompts (in the same order, checked by
    key), with a paired percentile-bootstrap interval; ``significant`` when it excludes 0."""
    if [d["key"] for d in base] != [d["key"] for d in other]:
        raise ValueError("paired_difference needs the same prompts in the same order")
    a, b = _arrays(base), _arrays(other)
    n = len(base)
    idx = _indices(n, boots, seed)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    out = {}
    for m in METRICS:
        dist = _metric(b, m, idx) - _metric(a, m, idx)
        value = float(_metric(b, m, np.arange(n)) - _metric(a, m, np.arange(n)))
        lo, hi = float(np.quantile(dist, lo_q)), float(np.quantile(dist, hi_q))
        out[m] = {"value": value, "lo": lo, "hi": hi, "significant": bool(lo > 0 or hi < 0)}
    return out
