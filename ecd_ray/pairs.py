"""Preference pairs from a seed's chain (plain Python, no Ray): ECD and APC.

**ECD**, for each level k >= 1 that is not an APC prompt: prompt = Ik, chosen = Rk, rejected =
R(k-1), the hard negative; with ``max_negative_gap = n`` also R(k-2) .. R(k-n) as further,
easier negatives.

**APC**, for each level that is an APC prompt (``level["apc"]``, strategy apc or mixed):
prompt = Ik, chosen and rejected = answers of two responders of different rank (stronger =
chosen), for the rank pairs ``apc.rank_pairs`` selects: ``adjacent``, ``all`` or
``extremes``. With ``apc.filter=checkers`` a pair whose rejected side meets more of the
level's checkable requirements than its chosen side is rejected as ``weaker_side_better``;
with a judge (``judge``, ``checkers+judge``) one the LLM judge decided for the weaker side is
rejected as ``judge_prefers_weaker`` (an unclear verdict keeps the pair).

Every pair is verified against level k's requirements (:mod:`ecd_ray.verify`) and the pair
policy decides whether it is written. A chosen answer cut at its token limit is rejected as
``chosen_truncated`` (unless ``pairs.truncated_chosen=keep``); a cut rejected answer is kept
and flagged ``rejected_truncated``. A pair whose two answers are identical teaches nothing and
is rejected. Each pair gets a difficulty and a curriculum stage (:mod:`ecd_ray.curriculum`).
A seed that yields no pair at all gets a ``no_pairs`` reject, so every seed is accounted for
in ``pairs/`` (or ``heldout/``) or ``rejects/``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ecd_ray.curriculum import DEFAULT_EDGES, annotate
from ecd_ray.schema import reject
from ecd_ray.verify import check_all, pair_verification, policy_reason, verification_columns

RANK_PAIRS = ("adjacent", "all", "extremes")


def pair_id(seed_id: str, chosen_level: int, rejected_level: int) -> str:
    return hashlib.sha256(f"{seed_id}:{chosen_level}:{rejected_level}".encode()).hexdigest()[:20]


def apc_pair_id(seed_id: str, level: int, chosen: str, rejected: str) -> str:
    key = f"apc:{seed_id}:{level}:{chosen}:{rejected}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def rank_pairs(ranks: list[int], how: str) -> list[tuple[int, int]]:
    """(stronger, weaker) rank pairs among the distinct ``ranks`` present, for ``how`` in
    :data:`RANK_PAIRS`; strongest first."""
    rs = sorted(set(ranks), reverse=True)
    if len(rs) < 2:
        return []
    if how == "adjacent":
        return [(rs[i], rs[i + 1]) for i in range(len(rs) - 1)]
    if how == "extremes":
        return [(rs[0], rs[-1])]
    if how == "all":
        return [(a, b) for i, a in enumerate(rs) for b in rs[i + 1:]]
    raise ValueError(f"unknown rank_pairs {how!r}; valid: {', '.join(RANK_PAIRS)}")


def is_heldout(seed_id: str, fraction: float, global_seed: int) -> bool:
    """Whether a seed belongs to the held-out evaluation split (a stable hash bucket)."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"heldout:{global_seed}:{seed_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _prompt(instruction: str, system_prompt: str | None) -> list[dict[str, str]]:
    # The conversation the answers were generated from, system prompt included.
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": instruction}]


def _row(chain: dict[str, Any], lvl: dict[str, Any], chosen: dict[str, Any],
         rejected: dict[str, Any], *, pair_id: str, strategy: str, rejected_level: int,
         ranks: tuple[int | None, int | None], verification: dict[str, Any], split: str,
         system_prompt: str | None) -> dict[str, Any]:
    """One PAIRS row: the prompt is ``lvl``'s instruction; ``chosen``/``rejected`` are answers
    (``response``, ``model``, ``finish_reason``): levels for ECD, responder answers for APC."""
    return {
        "pair_id": pair_id,
        "prompt": _prompt(lvl["instruction"], system_prompt),
        "chosen": _assistant(chosen["response"]),
        "rejected": _assistant(rejected["response"]),
        "seed_id": chain["seed_id"],
        "strategy": strategy,
        "chosen_level": lvl["level"],
        "rejected_level": rejected_level,
        "chosen_rank": ranks[0],
        "rejected_rank": ranks[1],
        "operation": lvl["operation"],
        "requirements": lvl["requirements"],
        "chosen_model": chosen["model"],
        "rejected_model": rejected["model"],
        "chosen_finish_reason": chosen["finish_reason"],
        "rejected_finish_reason": rejected["finish_reason"],
        **verification,
        "rejected_truncated": rejected["finish_reason"] == "length",
        "split": split,
    }


def _pair(chain: dict[str, Any], k: int, j: int, split: str, system_prompt: str | None
          ) -> dict[str, Any]:
    chosen, neg = chain["levels"][k], chain["levels"][j]
    return _row(chain, chosen, chosen, neg, pair_id=pair_id(chain["seed_id"], k, j),
                strategy="ecd", rejected_level=j, ranks=(None, None),
                verification=pair_verification(chosen, neg), split=split,
                system_prompt=system_prompt)


def level_answers(lvl: dict[str, Any], teacher: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every responder answer of an APC level (RESPONSE rows), the teacher's included when a
    responder is ``from_teacher`` (``teacher`` = {"name", "rank"}), strongest first."""
    out = list(lvl.get("responses") or [])
    if teacher is not None and lvl["response"] is not None:
        out.append({"responder": teacher["name"], "rank": teacher["rank"],
                    "model": lvl["model"], "response": lvl["response"],
                    "prompt_tokens": lvl["prompt_tokens"],
                    "completion_tokens": lvl["completion_tokens"],
                    "finish_reason": lvl["finish_reason"]})
    return sorted(out, key=lambda a: -a["rank"])


def apc_pairs(chain: dict[str, Any], lvl: dict[str, Any], *, teacher: dict[str, Any] | None,
              rank_pairs_how: str, filter_: str, split: str, system_prompt: str | None,
              ) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """APC pairs of one level and the (reason, detail, raw) of each candidate pair refused
    by the filter or for identical answers (pair policy and truncation are applied later)."""
    answers = level_answers(lvl, teacher)
    by_rank: dict[int, list[dict[str, Any]]] = {}
    passes: dict[str, list[bool]] = {}  # each answer is checked once, whatever its pairs
    for a in answers:
        by_rank.setdefault(a["rank"], []).append(a)
        passes[a["responder"]] = check_all(a["response"], lvl["requirements"])[0]
    pairs, refused = [], []
    for hi, lo in rank_pairs([a["rank"] for a in answers], rank_pairs_how):
        for good in by_rank[hi]:
            for bad in by_rank[lo]:
                name = f"{good['responder']}(rank {hi}) > {bad['responder']}(rank {lo})"
                if good["response"].strip() == bad["response"].strip():
                    refused.append(("identical_responses", f"apc {name}: same text",
                                    good["response"]))
                    continue
                pair = _row(chain, lvl, good, bad, pair_id=apc_pair_id(
                    chain["seed_id"], lvl["level"], good["responder"], bad["responder"]),
                    strategy="apc", rejected_level=lvl["level"], ranks=(good["rank"], bad["rank"]),
                    verification=verification_columns(passes[good["responder"]],
                                                      passes[bad["responder"]]),
                    split=split, system_prompt=system_prompt)
                verdict = next((j for j in lvl.get("judgements") or []
                                if (j["chosen"], j["rejected"]) ==
                                (good["responder"], bad["responder"])), None)
                if "judge" in filter_ and verdict is not None and \
                        verdict["verdict"] == "rejected":
                    refused.append(("judge_prefers_weaker", f"apc {name}: the judge preferred "
                                    f"the weaker answer (apc.filter={filter_})",
                                    verdict["raw"]))
                    continue
                if "checkers" in filter_ and pair["requirements"] and \
                        pair["rejected_missed"] < pair["chosen_missed"]:
                    refused.append(("weaker_side_better", f"apc {name}: the weaker side "
                                    f"misses {pair['rejected_missed']} of level {lvl['level']}'s "
                                    f"checkable requirements, the stronger "
                                    f"{pair['chosen_missed']} (apc.filter={filter_})", None))
                    continue
                pairs.append(pair)
    return pairs, refused


def build_pairs(
    chain: dict[str, Any], max_negative_gap: int = 1, policy: str = "all", split: str = "train",
    system_prompt: str | None = None, *, truncated_chosen: str = "reject",
    teacher: dict[str, Any] | None = None, rank_pairs_how: str = "adjacent",
    apc_filter: str = "checkers", stage_edges: tuple[float, ...] | list[float] = DEFAULT_EDGES,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pairs (rows of ``schema.PAIRS``) and rejects (rows of ``schema.REJECTS``) of one chain.

    ``chain`` is an EVOLUTIONS row that went through the verify stage (levels carry
    ``passes``). ``teacher``: {"name", "rank"} of the APC responder that is the teacher itself
    (None when no responder is).
    """
    levels = chain["levels"]
    seed_id, source = chain["seed_id"], chain["source"]
    candidates: list[dict[str, Any]] = []
    rejects = []
    for k in range(len(levels)):
        if levels[k].get("apc"):
            found, refused = apc_pairs(chain, levels[k], teacher=teacher,
                                       rank_pairs_how=rank_pairs_how, filter_=apc_filter,
                                       split=split, system_prompt=system_prompt)
            candidates += found
            rejects += [reject("pair", reason, detail, seed_id=seed_id, source=source, level=k,
                               raw=raw) for reason, detail, raw in refused]
            continue
        for j in range(k - 1, max(-1, k - 1 - max_negative_gap), -1):
            if levels[k]["response"].strip() == levels[j]["response"].strip():
                rejects.append(reject(
                    "pair", "identical_responses", f"R{k} and R{j} are the same text",
                    seed_id=seed_id, source=source, level=k, raw=levels[k]["response"]))
                continue
            candidates.append(_pair(chain, k, j, split, system_prompt))
    pairs = []
    for pair in candidates:
        k = pair["chosen_level"]
        name = (f"R{k}>R{pair['rejected_level']}" if pair["strategy"] == "ecd" else
                f"apc level {k} {pair['chosen_model']}>{pair['rejected_model']}")
        if truncated_chosen != "keep" and pair["chosen_finish_reason"] == "length":
            rejects.append(reject(
                "pair", "chosen_truncated", f"pair {name}: the chosen answer was cut at its "
                f"token limit (pairs.truncated_chosen={truncated_chosen}; raise "
                "teacher.max_new_tokens or use truncated_chosen=regenerate)",
                seed_id=seed_id, source=source, level=k))
            continue
        reason = policy_reason(pair, policy)
        if reason is None:
            pairs.append(annotate(pair, stage_edges))
            continue
        failed = [r["id"] for r, ok in zip(pair["requirements"], pair["chosen_passes"],
                                           strict=True) if not ok]
        detail = (f"pair {name}: chosen misses {failed}" if failed else
                  f"pair {name}: rejected meets every requirement of level {k}")
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
        op = att["operation"]
        stage = "answer" if op == "answer" else "respond" if op.startswith("respond:") \
            else "evolve"
        out.append(reject(
            stage, att["reason"], f"level {att['level']} {att['operation']} failed: "
            f"{att['reason']}", seed_id=chain["seed_id"], source=chain["source"],
            level=att["level"], raw=att["candidate"]))
    return out
