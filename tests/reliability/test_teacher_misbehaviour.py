"""A teacher that misbehaves, through the real ``openai`` engine and a real HTTP server.

:class:`scripted_teacher.ScriptedTeacher` answers every request by :func:`script`, which picks
the behaviour by the seed the request belongs to: empty answers and rewrites, answers and
rewrites cut at the token limit, answers and rewrites in another language, refusals, the
instruction or the evolution prompt echoed back, a body that is not UTF-8, a server that hangs
past the client's timeout (always, or once). Legitimate answers in other languages (French for
a French seed, German where the instruction asks for German) run beside them and must be kept.

Three layers: the engine alone (no Ray), the chains with the chain scheduler (no Ray), and the
whole ``generate`` job with Ray (``slow``), whose manifest must count every behaviour under its
reason and account for every seed exactly once.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest
from scripted_teacher import Record, Reply, ScriptedTeacher, completion_bytes

from ecd_ray.config import EvolutionConfig, OpenAIConfig, load_config
from ecd_ray.engines.base import ChatRequest, Sampling
from ecd_ray.engines.openai_engine import OpenAIEngine
from ecd_ray.evolution import ChainSettings
from ecd_ray.pairs import build_pairs
from ecd_ray.scheduler import ChainScheduler
from ecd_ray.verify import annotate_levels

TIMEOUT_S = 2.0  # the client's timeout here: every scripted answer comes back in milliseconds
MAX_RETRIES = 1
HANG_S = 60.0  # far past the timeout: only the client ends it

SEEDS = {  # seed id -> its instruction (English unless named otherwise)
    "ok": "Describe a quiet morning in a small fishing harbour, as seen by a gull.",
    "ok_french": "Décris une matinée tranquille dans un petit port de pêche, vue par une "
                 "mouette.",
    "ok_asks_german": "Describe a busy railway station at rush hour. Write your whole answer "
                      "in German.",
    "hang_once": "Explain why bread goes stale faster in the refrigerator than on the counter.",
    "empty_answer": "Write a short note thanking a neighbour for watering the garden plants.",
    "empty_rewrite": "Summarize the main reasons people keep bees in their back gardens.",
    "truncated_answer": "Explain how a bicycle gear system makes climbing hills easier.",
    "truncated_rewrite": "Give advice to someone planting their first vegetable garden.",
    "wrong_language_answer": "Explain how a refrigerator keeps food cold, step by step.",
    "wrong_language_rewrite": "Describe the sounds of a forest during a summer thunderstorm.",
    "refusal": "Write a friendly reminder about the office kitchen cleaning rota.",
    "echoed_answer": "Explain what makes a good cup of tea for someone who has never made one.",
    "echoed_rewrite": "Describe how a lighthouse keeper spends a long winter evening.",
    "unchanged_rewrite": "Explain how tides are caused by the moon and the sun together.",
    "invalid_utf8": "Describe the smell of a bakery early in the morning before it opens.",
    "hang": "Explain how a sundial tells the time and where it goes wrong.",
}
# seed id -> (the chain's stop reason, the "stage:reason" rejects its chain must produce)
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "ok": ("completed", set()),
    "ok_french": ("completed", set()),
    "ok_asks_german": ("completed", set()),
    "hang_once": ("completed", set()),
    "empty_answer": ("answer:empty_response", {"answer:empty_response", "pair:no_pairs"}),
    "empty_rewrite": ("evolve:empty", {"evolve:empty", "pair:no_pairs"}),
    "truncated_answer": ("completed", {"pair:chosen_truncated", "pair:no_pairs"}),
    "truncated_rewrite": ("evolve:truncated", {"evolve:truncated", "pair:no_pairs"}),
    "wrong_language_answer": ("answer:wrong_language",
                              {"answer:wrong_language", "pair:no_pairs"}),
    "wrong_language_rewrite": ("evolve:wrong_language",
                               {"evolve:wrong_language", "pair:no_pairs"}),
    "refusal": ("answer:refusal", {"answer:refusal", "pair:no_pairs"}),
    "echoed_answer": ("answer:echoed_prompt", {"answer:echoed_prompt", "pair:no_pairs"}),
    "echoed_rewrite": ("evolve:echoed_prompt", {"evolve:echoed_prompt", "pair:no_pairs"}),
    "unchanged_rewrite": ("evolve:unchanged", {"evolve:unchanged", "pair:no_pairs"}),
    "invalid_utf8": ("answer:invalid_utf8", {"answer:invalid_utf8", "pair:no_pairs"}),
    "hang": ("answer:timeout", {"answer:timeout", "pair:no_pairs"}),
}

FRENCH = ("Le port s'éveille doucement. Les bateaux de pêche rentrent un à un, chargés de "
          "poissons brillants, et les pêcheurs déchargent leurs caisses en parlant à voix basse. "
          "La mouette tourne au-dessus des quais, attend son heure, puis se pose sur un poteau "
          "pour observer les filets que l'on répare au soleil.")
GERMAN = ("Der Bahnhof ist zur Hauptverkehrszeit voller Menschen. Pendler eilen mit ihren "
          "Taschen zu den Gleisen, Durchsagen hallen durch die große Halle, und an den Kiosken "
          "bilden sich lange Schlangen. Die Züge kommen pünktlich an und fahren wieder ab, "
          "während die Reisenden ihre Plätze suchen.")
CHINESE = ("夏天的雷雨来临时，森林里先是一片寂静，然后风吹过树梢，"
           "树叶沙沙作响。远处传来低沉的雷声，雨点开始敲打树叶和地面。"
           "小溪的水声越来越大，鸟儿躲进树洞，整个森林都在雨中呼吸。")
REFUSAL = "I'm sorry, but I can't help with that."
NOT_UTF8 = b"A bakery smells of warm bread \xff\xfe and caf\xe9 au lait."

_REWRITE = re.compile(r"requirement: (?P<directive>.*?)\nDo not answer.*Given instruction:\n"
                      r"(?P<instruction>.*)\Z", re.DOTALL)


def english(instruction: str, level: int) -> str:
    """A well-behaved English answer (long enough for the language check to judge it)."""
    return (f"Answer at level {level}. A good answer starts with the main point, then gives two "
            "reasons and one concrete example, and ends with a short summary that repeats the "
            "key idea in plain words, so that a reader who skims still takes it away. "
            f"Here the task was: {instruction[:80]}")


def seed_of(instruction: str) -> str:
    """The seed an instruction grew from (a good rewrite starts with its seed's text)."""
    return next(sid for sid, text in SEEDS.items() if instruction.startswith(text))


def script(messages: list[dict[str, str]], seen: int) -> Reply:
    """The teacher's reply to one chat, by the seed it belongs to and the request's kind:
    the level-0 answer, the rewrite (evolve), or the level-1 answer."""
    prompt = messages[-1]["content"]
    rewrite = _REWRITE.search(prompt)
    if rewrite is not None:
        instruction, directive = rewrite["instruction"], rewrite["directive"]
        good = f"{instruction} {directive}"
        return {
            "empty_rewrite": Reply("", label="empty"),
            "truncated_rewrite": Reply(good[:40], "length", label="truncated"),
            "wrong_language_rewrite": Reply(CHINESE, label="wrong_language"),
            "echoed_rewrite": Reply(prompt, label="echoed_prompt"),
            "unchanged_rewrite": Reply(instruction, label="unchanged"),
        }.get(seed_of(instruction), Reply(good))
    sid = seed_of(prompt)
    level = 0 if prompt == SEEDS[sid] else 1
    if sid == "ok_french":
        return Reply(f"Niveau {level}. {FRENCH}")
    if sid == "ok_asks_german":
        return Reply(f"Stufe {level}. {GERMAN}")
    if sid == "hang_once" and level == 0 and seen == 0:
        return Reply(english(prompt, level), hang_s=HANG_S, label="hang_once")
    if level == 0:
        misbehaviour = {
            "empty_answer": Reply("", label="empty"),
            "refusal": Reply(REFUSAL, label="refusal"),
            "echoed_answer": Reply(prompt, label="echoed_prompt"),
            # level 0: the seed's text is ours (a drawn directive may name a language)
            "wrong_language_answer": Reply(GERMAN, label="wrong_language"),
            "invalid_utf8": Reply(body=completion_bytes(NOT_UTF8), label="invalid_utf8"),
            "hang": Reply(hang_s=HANG_S, label="hang"),
        }.get(sid)
    else:
        misbehaviour = {
            "truncated_answer": Reply(english(prompt, level)[:60], "length", label="truncated"),
        }.get(sid)
    return misbehaviour or Reply(english(prompt, level))


def seed_rows() -> list[dict[str, Any]]:
    return [{"seed_id": sid, "source": f"seeds.jsonl:{i + 1}", "instruction": text,
             "response": None} for i, (sid, text) in enumerate(SEEDS.items())]


@pytest.fixture
def teacher() -> Any:
    with ScriptedTeacher(script) as server:
        yield server


def _engine(base_url: str, **kw: Any) -> OpenAIEngine:
    cfg = OpenAIConfig(base_url=base_url, api_key_env=None, backoff_base_s=0.01,
                       backoff_max_s=0.05, **{"timeout_s": TIMEOUT_S,
                                              "max_retries": MAX_RETRIES, **kw})
    return OpenAIEngine(cfg, model_name="scripted")


def _ask(text: str, rid: str) -> ChatRequest:
    return ChatRequest(rid, [{"role": "user", "content": text}], Sampling(max_new_tokens=64))


def _attempts(records: list[Record], label: str) -> list[Record]:
    return [r for r in records if r.reply.label == label]


# ---------------------------------------------------------------------------------------------
# The engine alone (no Ray)


def test_server_serves_models_and_health(teacher: ScriptedTeacher) -> None:
    with urllib.request.urlopen(teacher.base_url + "/models", timeout=5) as resp:  # noqa: S310
        assert json.load(resp)["data"][0]["id"] == "scripted"
    root = teacher.base_url.removesuffix("/v1")
    with urllib.request.urlopen(root + "/health", timeout=5) as resp:  # noqa: S310
        assert resp.status == 200


def test_body_that_is_not_utf8_fails_its_request_only(teacher: ScriptedTeacher) -> None:
    reqs = [_ask(SEEDS["invalid_utf8"], "bad"), _ask(SEEDS["ok"], "good")]
    bad, good = _engine(teacher.base_url).generate(reqs)
    assert bad.finish_reason == "error" and bad.error_code == "invalid_utf8", bad
    assert "not UTF-8" in (bad.error or "") and bad.text == ""
    assert good.error is None and good.text == english(SEEDS["ok"], 0)
    # the same through agenerate (what the chain actor calls), and never retried
    engine = _engine(teacher.base_url)

    async def once() -> Any:
        try:
            return await engine.agenerate(reqs[0])
        finally:
            engine.close()

    assert asyncio.run(once()).error_code == "invalid_utf8"
    assert len(_attempts(teacher.snapshot(), "invalid_utf8")) == 2  # one per call


def test_hang_past_the_timeout_is_retried_then_classified(teacher: ScriptedTeacher) -> None:
    reqs = [_ask(SEEDS["hang"], "hang"), _ask(SEEDS["hang_once"], "once"),
            _ask(SEEDS["ok"], "good")]
    t0 = time.monotonic()
    hung, once, good = _engine(teacher.base_url, timeout_s=0.5).generate(reqs)
    elapsed = time.monotonic() - t0
    assert hung.finish_reason == "error" and hung.error_code == "timeout", hung
    assert "gave up after 2 attempt(s): TimeoutError" in (hung.error or "")
    assert once.error is None and once.text == english(SEEDS["hang_once"], 0)  # the retry
    assert good.error is None
    hangs = _attempts(teacher.settled(), "hang")
    assert len(hangs) == MAX_RETRIES + 1
    # the client gave up on each attempt after its timeout; the server never answered
    assert all(not r.completed and r.ended is not None and 0.4 < r.ended - r.started < 5
               for r in hangs), [(r.completed, r.started, r.ended) for r in hangs]
    assert elapsed < HANG_S / 2


# ---------------------------------------------------------------------------------------------
# The chains (the real engine and scheduler; no Ray)


def _chains(base_url: str) -> list[dict[str, Any]]:
    settings = ChainSettings.build(EvolutionConfig(mode="teacher"), rounds=1, seed=0,
                                   answer=Sampling(max_new_tokens=64), answer_model="scripted")
    engine = _engine(base_url, concurrency=8)
    rows: list[dict[str, Any]] = []

    async def run() -> None:
        try:
            await ChainScheduler(engine, settings).run(seed_rows(),
                                                        lambda c: rows.append(c.to_row()))
        finally:
            engine.close()

    asyncio.run(run())
    return rows


def _classified(chains: list[dict[str, Any]], pairs_of: Callable[[str], int]) -> None:
    """Every seed's chain stopped for its expected reason and gave exactly the rejects
    expected of it; ``pairs_of(seed_id)``: how many pairs it gave."""
    assert sorted(c["seed_id"] for c in chains) == sorted(SEEDS)
    got = {c["seed_id"]: c["stop_reason"] for c in chains}
    assert got == {sid: stop for sid, (stop, _) in EXPECTED.items()}
    for sid, (_, rejects) in EXPECTED.items():
        assert (pairs_of(sid) > 0) == (not rejects), (sid, pairs_of(sid))


def test_chains_classify_every_misbehaviour(teacher: ScriptedTeacher) -> None:
    chains = _chains(teacher.base_url)
    pairs: Counter[str] = Counter()
    for chain in chains:
        kept, rejected = build_pairs(annotate_levels(chain), policy="all")
        pairs[chain["seed_id"]] += len(kept)
        reasons = {f"{r['stage']}:{r['reason']}" for r in rejected}
        assert reasons == EXPECTED[chain["seed_id"]][1], chain["seed_id"]
    _classified(chains, pairs.__getitem__)
    # legitimate answers in another language were kept whole
    by_id = {c["seed_id"]: c for c in chains}
    assert all(FRENCH in lvl["response"] for lvl in by_id["ok_french"]["levels"])
    assert all(GERMAN in lvl["response"] for lvl in by_id["ok_asks_german"]["levels"])


# ---------------------------------------------------------------------------------------------
# The whole generation job (Ray)


def _table(folder: Path) -> list[dict[str, Any]]:
    return pads.dataset(folder, format="parquet").to_table().to_pylist() if folder.exists() else []


@pytest.mark.slow
def test_generate_counts_every_misbehaviour_and_accounts_for_every_seed(
    teacher: ScriptedTeacher, tmp_path: Path,
) -> None:
    from ecd_ray.pipeline.generate import generate

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": sid, "instruction": text}) + "\n"
                             for sid, text in SEEDS.items()), encoding="utf-8")
    cfg = load_config(None, [
        "run_name=misbehaving", f"output_dir={tmp_path}", f"seeds.path={seeds}",
        "seeds.id_column=id", "rounds=1", "evolution.mode=teacher", "pairs.policy=all",
        "pairs.holdout_fraction=0", "teacher.engine=openai", "teacher.model=scripted",
        f"teacher.openai.base_url={teacher.base_url}", "teacher.openai.api_key_env=null",
        f"teacher.openai.timeout_s={TIMEOUT_S}", f"teacher.openai.max_retries={MAX_RETRIES}",
        "teacher.openai.backoff_base_s=0.01", "teacher.openai.concurrency=8",
        "teacher.max_new_tokens=64", "teacher.num_cpus=1", "ray.num_cpus=2",
        "scheduler.flush_rows=4",
    ])
    t0 = time.monotonic()
    manifest = generate(cfg)
    wall = time.monotonic() - t0
    run_dir = tmp_path / "misbehaving"
    records = teacher.settled()

    # every seed accounted for exactly once
    acct, counts = manifest["accounting"], manifest["counts"]
    assert manifest["status"] == "complete" and acct["ok"], acct
    assert acct["chains"] == counts["chains"] == counts["seeds_valid"] == len(SEEDS)
    assert acct["duplicate_chains"] == acct["missing_chains"] == 0
    assert acct["unaccounted_seed_ids"] == []
    chains = _table(run_dir / "evolutions")
    pairs = Counter(p["seed_id"] for p in _table(run_dir / "pairs"))
    _classified(chains, pairs.__getitem__)

    # every behaviour counted under its reason: the chains' stop reasons and the rejects
    stops = Counter(stop for stop, _ in EXPECTED.values())
    assert counts["chain_stop_reasons"] == dict(stops)
    rejects = Counter(r for _, rs in EXPECTED.values() for r in rs)
    assert counts["rejects"] == dict(rejects), counts["rejects"]
    by_seed: dict[str, set[str]] = {}
    for r in _table(run_dir / "rejects"):
        by_seed.setdefault(r["seed_id"], set()).add(f"{r['stage']}:{r['reason']}")
    assert by_seed == {sid: rs for sid, (_, rs) in EXPECTED.items() if rs}
    assert counts["pairs"] == sum(pairs.values()) == 4  # the four well-answered seeds

    # the hang: tried 1 + max_retries times, each ended by the client's timeout
    hangs = _attempts(records, "hang")
    assert len(hangs) == MAX_RETRIES + 1 and not any(r.completed for r in hangs)
    waited = [r.ended - r.started for r in hangs + _attempts(records, "hang_once")
              if r.ended is not None]
    assert all(TIMEOUT_S * 0.9 < w < TIMEOUT_S * 3 for w in waited), waited
    assert len(_attempts(records, "invalid_utf8")) == 1  # not retried
    print(f"\nscripted teacher: {len(records)} requests, {len(hangs)} + "
          f"{len(_attempts(records, 'hang_once'))} hung (client timeout {TIMEOUT_S} s, "
          f"waited {sum(waited):.1f} s in all); generate took {wall:.1f} s, chains "
          f"{manifest['timings']['chains_s']} s; rejects {counts['rejects']}")
