"""ECD preference pairs from a seed's chain (plain Python, no Ray).

For each level k >= 1: prompt = Ik, chosen = Rk, rejected = R(k-1), the hard negative; with
``max_negative_gap = n`` also R(k-2) .. R(k-n) as further, easier negatives. Each pair is
verified against level k's requirements (:mod:`ecd_ray.verify`) and the pair policy decides
whether it is written. A pair whose two answers are identical teaches nothing and is rejected.
A seed that yields no pair at all gets a ``no_pairs`` reject, so every seed is accounted for in
``pairs/`` (or ``heldout/``) or ``rejects/``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ecd_ray.schema import reject
from ecd_ray.verify import pair_verification, policy_reason


def pair_id(seed_id: str, chosen_level: int, rejected_level: int) -> str:
    return hashlib.sha256(f"{seed_id}:{chosen_level}:{rejected_level}".encode()).hexdigest()[:20]


def is_heldout(seed_id: str, fraction: float, global_seed: int) -> bool:
    """Whether a seed belongs to the held-out evaluation split (a stable hash bucket)."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"heldout:{global_seed}:{seed_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _pair(chain: dict[str, Any], k: int, j: int, split: str, system_prompt: str | None
          ) -> dict[str, Any]:
    chosen, neg = chain["levels"][k], chain["levels"][j]
    # The conversation the chosen answer was generated from, system prompt included.
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return {
        "pair_id": pair_id(chain["seed_id"], k, j),
        "prompt": system + [{"role": "user", "content": chosen["instruction"]}],
        "chosen": _assistant(chosen["response"]),
        "rejected": _assistant(neg["response"]),
        "seed_id": chain["seed_id"],
        "strategy": "ecd",
        "chosen_level": k,
        "rejected_level": j,
        "operation": chosen["operation"],
        "requirements": chosen["requirements"],
        "chosen_model": chosen["model"],
        "rejected_model": neg["model"],
        "chosen_finish_reason": chosen["finish_reason"],
        "rejected_finish_reason": neg["finish_reason"],
        **pair_verification(chosen, neg),
        "split": split,
    }


def build_pairs(
    chain: dict[str, Any], max_negative_gap: int = 1, policy: str = "all", split: str = "train",
    system_prompt: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pairs (rows of ``schema.PAIRS``) and rejects (rows of ``schema.REJECTS``) of one chain.

    ``chain`` is an EVOLUTIONS row that went through the verify stage (levels carry
    ``passes``).
    """
    levels = chain["levels"]
    seed_id, source = chain["seed_id"], chain["source"]
    pairs, rejects = [], []
    for k in range(1, len(levels)):
        for j in range(k - 1, max(-1, k - 1 - max_negative_gap), -1):
            if levels[k]["response"].strip() == levels[j]["response"].strip():
                rejects.append(reject(
                    "pair", "identical_responses", f"R{k} and R{j} are the same text",
                    seed_id=seed_id, source=source, level=k, raw=levels[k]["response"]))
                continue
            pair = _pair(chain, k, j, split, system_prompt)
            reason = policy_reason(pair, policy)
            if reason is None:
                pairs.append(pair)
                continue
            failed = [r["id"] for r, ok in zip(pair["requirements"], pair["chosen_passes"],
                                               strict=True) if not ok]
            detail = (f"pair R{k}>R{j}: chosen misses {failed}" if failed else
                      f"pair R{k}>R{j}: rejected meets every requirement of level {k}")
            rejects.append(reject("pair", reason, f"{detail} (pairs.policy={policy})",
                                  seed_id=seed_id, source=source, level=k))
    rejects += chain_rejects(chain)
    if not pairs:
        rejects.append(reject(
            "pair", "no_pairs", f"chain has {len(levels)} answered level(s) "
            f"(stopped: {chain['stop_reason']}) and no pair passed pairs.policy={policy}",
            seed_id=seed_id, source=source))
    return pairs, rejects


def chain_rejects(chain: dict[str, Any]) -> list[dict[str, Any]]:
    """One reject per failed evolution or answer attempt recorded in the chain."""
    out = []
    for att in chain["rejected_attempts"]:
        stage = "answer" if att["operation"] == "answer" else "evolve"
        out.append(reject(
            stage, att["reason"], f"level {att['level']} {att['operation']} failed: "
            f"{att['reason']}", seed_id=chain["seed_id"], source=chain["source"],
            level=att["level"], raw=att["candidate"]))
    return out
