"""The transformers engine: shared batches, per-request seeds, limits, refusals, async batching.

All on the tiny random Llama (SmolLM2's tokenizer), float32 on CPU, a few tokens a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from ecd_ray.engines.base import (
    ENGINE_ERROR,
    PROMPT_TOO_LONG,
    TOKENIZER_ERROR,
    ChatRequest,
    Sampling,
)
from ecd_ray.engines.hf import RowSampler, TransformersEngine, pick_dtype
from ecd_ray.hardware import cpu_info, has_native_bf16


def chat(i: int, text: str, **sampling: float) -> ChatRequest:
    return ChatRequest(f"r{i}", [{"role": "user", "content": text}], Sampling(**sampling))


def mixed_batch() -> list[ChatRequest]:
    """Six requests: different prompts (lengths), seeds, temperatures, top-p and limits."""
    temps = [1.0, 0.7, 0.0, 1.3, 0.5, 1.0]
    top_ps = [0.95, 0.9, 1.0, 0.8, 0.5, 1.0]
    max_new = [12, 8, 10, 4, 12, 6]
    return [
        chat(i, "please " * (4 * i) + f"write line {i}.", temperature=temps[i],
             top_p=top_ps[i], max_new_tokens=max_new[i], seed=1000 + 17 * i)
        for i in range(6)
    ]


class CallCounter:
    """Wraps ``model.generate`` and counts its calls."""

    def __init__(self, engine: TransformersEngine):
        self.calls = 0
        self.rows: list[int] = []
        self._inner = engine.model.generate

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        self.calls += 1
        self.rows.append(int(kwargs["input_ids"].shape[0]))  # type: ignore[union-attr]
        return self._inner(*args, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[TransformersEngine]:
    eng = TransformersEngine(tiny_model, dtype="float32", max_batch=16)
    yield eng
    eng.close()


@pytest.fixture
def counter(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> CallCounter:
    count = CallCounter(engine)
    monkeypatch.setattr(engine.model, "generate", count)
    return count


def test_dtype_choice(engine: TransformersEngine) -> None:
    assert (engine.dtype_name, engine.dtype_reason) == ("float32", "set in config")
    assert engine.capacity == engine.max_batch == 16
    assert pick_dtype("auto", "cuda") == torch.bfloat16
    native = has_native_bf16(cpu_info()["flags"])
    assert pick_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert pick_dtype("float32", "cuda") == torch.float32


def test_batch_invariance(engine: TransformersEngine) -> None:
    """Every request answers the same alone and inside a mixed, left-padded batch."""
    reqs = mixed_batch()
    together = engine.generate(reqs)
    for req, res in zip(reqs, together, strict=True):
        assert engine.generate([req]) == [res]
    # the first request (shortest prompt, so the most padding) is really sampled at T=1.0
    assert reqs[0].sampling.temperature == 1.0 and together[0].completion_tokens == 12
    # the order inside the batch does not matter either
    assert engine.generate(reqs[::-1]) == together[::-1]


def test_one_generate_call_for_different_seeds(engine: TransformersEngine,
                                               counter: CallCounter,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    results = engine.generate(mixed_batch())
    assert counter.calls == 1 and counter.rows == [6]
    assert all(r.error is None for r in results)
    monkeypatch.setattr(engine, "max_batch", 4)
    engine.generate(mixed_batch())
    assert counter.rows == [6, 4, 2]


def test_seeds(engine: TransformersEngine) -> None:
    reqs = [chat(i, "Tell me a story.", temperature=1.0, top_p=1.0, max_new_tokens=10,
                 seed=s) for i, s in enumerate([1, 2, 3, 1])]
    out = engine.generate(reqs)
    texts = [r.text for r in out]
    assert texts[0] == texts[3]                  # same seed, same output
    assert len({texts[0], texts[1], texts[2]}) == 3  # different seeds, different outputs
    assert engine.generate(reqs[:1])[0] == out[0]  # and again, in a new batch
    greedy = [chat(i, "Tell me a story.", temperature=0.0, max_new_tokens=10, seed=s)
              for i, s in enumerate([1, 2])]
    a, b = engine.generate(greedy)
    assert a == b  # temperature 0: the seed plays no part


def test_per_row_limits(engine: TransformersEngine) -> None:
    reqs = mixed_batch()
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        assert res.completion_tokens <= req.sampling.max_new_tokens
        assert (res.finish_reason == "length") == (
            res.completion_tokens == req.sampling.max_new_tokens)


def test_min_new_tokens_and_eos(engine: TransformersEngine) -> None:
    """With the model pushed hard towards EOS, rows stop at once unless min_new_tokens holds
    them: each row at its own minimum, in one shared batch."""
    eos = engine.eos_ids[0]

    def favour_eos(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., eos] += 1e4
        return output

    handle = engine.model.lm_head.register_forward_hook(favour_eos)
    try:
        mins = [0, 3, 5, 20, 2]
        reqs = [chat(i, f"Say {i}.", temperature=[1.0, 1.0, 0.0, 1.0, 0.7][i],
                     max_new_tokens=8, min_new_tokens=m, seed=i) for i, m in enumerate(mins)]
        out = engine.generate(reqs)
    finally:
        handle.remove()
    assert [r.completion_tokens for r in out] == [1, 4, 6, 8, 3]
    assert [r.finish_reason for r in out] == ["stop", "stop", "stop", "length", "stop"]
    assert out[0].text == ""


def expected_distribution(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """softmax(logits / T) restricted to the top-p nucleus, renormalised (numpy only)."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, dtype=bool)
    keep[order[before < top_p]] = True
    if top_p < 1.0:  # the test is only meaningful away from the nucleus boundary
        assert np.min(np.abs(before - top_p)) > 0.01
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize(("temperature", "top_p"), [(0.8, 0.9), (1.0, 1.0), (1.7, 0.75)])
def test_sampler_matches_filtered_softmax(temperature: float, top_p: float) -> None:
    logits = np.array([2.0, 1.4, 1.1, 0.5, 0.0, -0.4, -1.0, -3.0])
    expected = expected_distribution(logits, temperature, top_p)
    n = 20_000
    sampler = RowSampler([Sampling(temperature=temperature, top_p=top_p, seed=s)
                          for s in range(n)], eos_ids=[7], prompt_len=3)
    scores = torch.tensor(logits, dtype=torch.float32).repeat(n, 1)
    picks = sampler(torch.zeros((n, 3), dtype=torch.long), scores).argmax(dim=-1).numpy()
    observed = np.bincount(picks, minlength=len(logits)) / n
    kept = expected > 0
    assert np.all(observed[~kept] == 0)  # nothing outside the nucleus, ever
    chi2 = n * np.sum((observed[kept] - expected[kept]) ** 2 / expected[kept])
    assert chi2 < 30.0, (chi2, observed, expected)  # df <= 7: p ~ 1e-4
    assert np.max(np.abs(observed - expected)) < 0.015


def test_sampler_rows_are_independent() -> None:
    """A row's noise depends on its seed and step only: the same seed gives the same scores in
    any position of any batch, and the stream moves on with each step."""
    torch.manual_seed(0)
    scores = torch.randn(1, 50).repeat(3, 1)
    ids = torch.zeros((3, 4), dtype=torch.long)
    trio = RowSampler([Sampling(temperature=1.0, seed=s) for s in (5, 9, 5)], [0], 4)
    alone = RowSampler([Sampling(temperature=1.0, seed=5)], [0], 4)
    first, second = trio(ids, scores), trio(ids, scores)
    assert torch.equal(first[0], first[2]) and not torch.equal(first[0], first[1])
    assert torch.equal(alone(ids[:1], scores[:1])[0], first[0])
    assert torch.equal(alone(ids[:1], scores[:1])[0], second[0])
    assert not torch.equal(first[0], second[0])


def test_sampler_min_new_tokens_and_greedy() -> None:
    scores = torch.tensor([[0.0, 1.0, 9.0, 2.0]]).repeat(3, 1)  # token 2 (EOS) dominates
    samplings = [Sampling(temperature=0.0, min_new_tokens=2),
                 Sampling(temperature=1.0, top_p=0.5, min_new_tokens=1, seed=3),
                 Sampling(temperature=0.0)]
    sampler = RowSampler(samplings, eos_ids=[2], prompt_len=5)
    picks = [sampler(torch.zeros((3, 5 + step), dtype=torch.long), scores).argmax(-1).tolist()
             for step in range(3)]
    assert picks == [[3, 3, 2], [3, 2, 2], [2, 2, 2]]


def test_agenerate_batches_concurrent_requests(engine: TransformersEngine,
                                               counter: CallCounter,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = [*mixed_batch(), chat(6, "One more.", temperature=1.0, max_new_tokens=5, seed=6),
            chat(7, "And another.", temperature=0.9, top_p=0.7, max_new_tokens=9, seed=7)]
    expected = engine.generate(reqs)
    counter.calls, counter.rows = 0, []

    async def run_all() -> list:
        return await asyncio.gather(*(engine.agenerate(r) for r in reqs))

    assert asyncio.run(run_all()) == expected
    assert counter.calls < 8 and sum(counter.rows) == 8

    # a batch never exceeds max_batch; requests arriving while one runs queue up
    monkeypatch.setattr(engine, "max_batch", 3)
    counter.calls, counter.rows = 0, []

    async def staggered() -> list:
        first = [asyncio.ensure_future(engine.agenerate(r)) for r in reqs[:2]]
        await asyncio.sleep(0.05)  # the first batch is running
        rest = [asyncio.ensure_future(engine.agenerate(r)) for r in reqs[2:]]
        return await asyncio.gather(*first, *rest)

    assert asyncio.run(staggered()) == expected
    assert max(counter.rows) <= 3 and sum(counter.rows) == 8 and counter.calls <= 4


def test_refused_requests_never_join_a_batch(tiny_model: Path) -> None:
    eng = TransformersEngine(tiny_model, dtype="float32", max_model_len=64)
    try:
        counter = CallCounter(eng)
        eng.model.generate = counter  # type: ignore[method-assign]
        reqs = [chat(0, "Hi.", temperature=1.0, max_new_tokens=8, seed=1),
                chat(1, "Explain, in detail, " + "why the sky is blue and " * 20 + "why.",
                     temperature=1.0, max_new_tokens=8, seed=2),
                ChatRequest("r2", [{"content": "no role"}], Sampling(max_new_tokens=8)),
                chat(3, "Bye.", temperature=0.5, max_new_tokens=8, seed=3)]
        out = eng.generate(reqs)
        assert out[1].error_code == PROMPT_TOO_LONG and out[1].finish_reason == "error"
        assert "max_model_len" in (out[1].error or "") and out[1].prompt_tokens > 64
        assert out[2].error_code == TOKENIZER_ERROR
        for ok in (out[0], out[3]):
            assert ok.error is None and ok.completion_tokens == 8 and ok.finish_reason == "length"
        assert counter.rows == [2]
        # the async path refuses the same way, and its neighbours are answered
        async def run_all() -> list:
            return await asyncio.gather(*(eng.agenerate(r) for r in reqs))
        assert asyncio.run(run_all()) == out
    finally:
        eng.close()


def test_engine_error_fails_only_its_batch(engine: TransformersEngine,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = mixed_batch()[:3]
    good = engine.generate(reqs)
    inner = engine.model.generate
    state = {"fail": True}

    def flaky(*args: object, **kwargs: object) -> torch.Tensor:
        if state.pop("fail", False):
            raise RuntimeError("out of memory (simulated)")
        return inner(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", flaky)
    bad = engine.generate(reqs)
    assert [r.error_code for r in bad] == [ENGINE_ERROR] * 3
    assert all("simulated" in (r.error or "") for r in bad)
    assert engine.generate(reqs) == good  # the engine keeps working
