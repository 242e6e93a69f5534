"""The ``transformers`` engine: truly batched ``generate`` on CPU or GPU; runs anywhere.

Batching. Requests with different seeds, temperatures, top-p, ``max_new_tokens`` and
``min_new_tokens`` share one left-padded ``model.generate`` call (up to ``max_batch`` rows).
``model.generate`` runs greedy (``do_sample=False``); the sampling happens in
:class:`RowSampler`, a logits processor that, per row, applies that row's temperature, top-p
filter and ``min_new_tokens`` (EOS masked until reached) and adds Gumbel noise from a
``torch.Generator`` of the row's own: argmax(logits / T + Gumbel) is an exact sample from the
filtered softmax. :class:`RowLimits` stops each row at its own ``max_new_tokens``.

Reproducibility. A request's output is a function of its prompt, its ``Sampling`` (seed
included) and the model/dtype/device only, not of which other requests share its batch nor of
its position in it: each row's noise comes from a generator seeded with ``sampling.seed`` alone,
one draw of vocabulary-size float64 uniforms per decode step, so the noise stream depends only
on the seed and the step (exactly so; ``tests/test_hf_engine.py`` checks it). Temperature-0
rows are greedy (no noise). The one caveat is floating point: the model's logits for a row are
not always bitwise the same alone and in a batch, so a near-tie can flip a token and the rest of
the answer with it. Observed on CPU (AMD EPYC with avx512_bf16, torch 2.13, transformers 5.19):

* batching alone is bitwise invariant: a row's logits in a batch of equal-length prompts equal
  its logits alone, in float32 and bfloat16;
* left padding is not: the padded row's logits differ by up to ~4e-7 in float32 and ~6e-3 in
  bfloat16 (tiny 2-layer model);
* outputs (24 tokens, 6 mixed requests, alone vs together): identical for all 6 in float32 on
  both the tiny model and SmolLM2-135M-Instruct, and in bfloat16 on the tiny model; in
  bfloat16 on SmolLM2-135M-Instruct 2 of 6 answers differed (a greedy and a T=0.5 row).

So batch-composition independence holds in practice in float32 and only approximately in
bfloat16 (which ``auto`` picks on CPUs with native bf16: 1.9x the tokens/s of float32 for
SmolLM2-135M, 8 rows, on a 2-core EPYC); pin ``dtype: float32`` where answers must not
depend on what else was in flight.

Two ways in (see :mod:`ecd_ray.engines.base`): the blocking ``generate(requests)`` and
``await agenerate(request)``, a dynamic batcher: requests that arrive while a batch runs queue
up, and whenever the model is idle up to ``max_batch`` queued requests run as one batch in a
worker thread. A request whose chat template fails, or whose prompt + ``max_new_tokens``
exceeds the context, comes back as an error result and never joins a batch; an exception in a
batch's ``generate`` fails that batch's requests (``engine_error``) and the engine goes on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor, StoppingCriteria

from ecd_ray.engines.base import (
    ENGINE_ERROR,
    TOKENIZER_ERROR,
    ChatRequest,
    GenerationResult,
    Sampling,
    failed,
    too_long,
)
from ecd_ray.hardware import resolve_dtype

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SEED_MASK = (1 << 64) - 1


def pick_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype to load a model in: ``auto`` follows :func:`ecd_ray.hardware.resolve_dtype`
    (bf16 on a GPU; on a CPU bf16 only with native bf16 instructions, else fp32)."""
    dtype_name, _ = resolve_dtype(name, on_gpu=str(device).startswith("cuda"))
    return _DTYPES[dtype_name]


class RowSampler(LogitsProcessor):
    """Per-row temperature, top-p, ``min_new_tokens`` and seeded Gumbel noise.

    Use with ``model.generate(do_sample=False)``: the argmax of the returned scores is, for a
    row with temperature > 0, an exact sample from softmax(logits / T) restricted to the top-p
    nucleus; for a row with temperature <= 0 it is the greedy token. Row ``i``'s noise at
    decode step ``s`` is the ``s``-th draw of ``vocab`` uniforms from a generator seeded with
    ``samplings[i].seed``, so it does not depend on the other rows.
    """

    def __init__(self, samplings: Sequence[Sampling], eos_ids: Sequence[int], prompt_len: int,
                 device: str | torch.device = "cpu"):
        self.prompt_len = prompt_len
        self.device = torch.device(device)
        self.eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=self.device)
        self.sampled = [s.temperature > 0 for s in samplings]
        self.temperature = torch.tensor(
            [s.temperature if s.temperature > 0 else 1.0 for s in samplings],
            dtype=torch.float32, device=self.device)
        self.top_p = torch.tensor([s.top_p for s in samplings], dtype=torch.float32,
                                  device=self.device)
        self.filter_top_p = torch.tensor(
            [s.temperature > 0 and s.top_p < 1.0 for s in samplings], device=self.device)
        self.min_new = torch.tensor([s.min_new_tokens for s in samplings], device=self.device)
        self.generators: list[torch.Generator | None] = []
        for s, sampled in zip(samplings, self.sampled, strict=True):
            gen = None
            if sampled:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(int(s.seed) & _SEED_MASK)
            self.generators.append(gen)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor
                 ) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len  # tokens generated so far
        scores = scores.to(torch.float32, copy=True)
        early = (self.min_new > step).nonzero(as_tuple=True)[0]
        if early.numel() and self.eos_ids.numel():
            scores[early[:, None], self.eos_ids[None, :]] = float("-inf")
        scores = scores / self.temperature[:, None]
        rows = self.filter_top_p.nonzero(as_tuple=True)[0]
        if rows.numel():
            scores[rows] = self._top_p(scores[rows], self.top_p[rows])
        out = scores.to(torch.float64)
        sampled = [i for i, gen in enumerate(self.generators) if gen is not None]
        if sampled:
            vocab = scores.shape[-1]
            u = torch.stack([
                torch.rand(vocab, generator=self.generators[i], dtype=torch.float64,
                           device=self.device)
                for i in sampled
            ])
            # Gumbel(0, 1) = -log(-log(u)); u == 0 (p = 2**-53) gives -inf: never chosen.
            out[sampled] += u.log_().neg_().log_().neg_()
        return out  # type: ignore[return-value]

    @staticmethod
    def _top_p(scores: torch.Tensor, top_p: torch.Tensor, fast_k: int = 1024) -> torch.Tensor:
        """Keep, per row, the smallest set of most likely tokens whose probability reaches
        ``top_p``: a token goes when the tokens ranked above it already reach ``top_p``.

        A row whose nucleus lies within its ``fast_k`` most likely tokens (known from their
        mass) is ranked with ``topk``; the others with a full sort. The choice is per row.
        """
        probs = torch.softmax(scores, dim=-1)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        k = min(fast_k, scores.shape[-1])
        top, order = probs.topk(k, dim=-1)
        fast = top.cumsum(dim=-1)[:, -1] >= top_p
        slow = (~fast).nonzero(as_tuple=True)[0]
        fast = fast.nonzero(as_tuple=True)[0]
        for idx, (ranked, rank_order) in (
            (fast, (top[fast], order[fast])),
            (slow, probs[slow].sort(dim=-1, descending=True, stable=True)),
        ):
            if not idx.numel():
                continue
            before = ranked.cumsum(dim=-1) - ranked
            kept = before < top_p[idx, None]
            kept[:, 0] = True
            keep[idx] = torch.zeros_like(keep[idx]).scatter_(1, rank_order, kept)
        return scores.masked_fill(~keep, float("-inf"))


class RowLimits(StoppingCriteria):
    """Stops each row once it has generated its own ``max_new_tokens``."""

    def __init__(self, max_new_tokens: Sequence[int], prompt_len: int,
                 device: str | torch.device = "cpu"):
        self.prompt_len = prompt_len
        self.max_new = torch.tensor(list(max_new_tokens), device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None,
                 **kwargs: object) -> torch.BoolTensor:
        done = self.max_new <= input_ids.shape[1] - self.prompt_len
        return done.to(input_ids.device)  # type: ignore[return-value]


@dataclass
class _Prepared:
    """A request that passed the checks: its prompt token ids."""

    request: ChatRequest
    ids: list[int]


class TransformersEngine:
    """Chat generation with ``AutoModelForCausalLM.generate``: left-padded batches in which
    every request keeps its own sampling settings and seed (see the module docstring)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        max_batch: int = 16,
        threads: int | None = None,
        device: str | None = None,
        model_name: str | None = None,
        max_model_len: int | None = None,
        batch_wait_s: float = 0.002,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model_name = model_name or str(model_dir)
        self.max_batch = max(1, int(max_batch))
        self.capacity = self.max_batch
        self.batch_wait_s = batch_wait_s
        self.dtype_name, self.dtype_reason = resolve_dtype(
            dtype, on_gpu=str(self.device).startswith("cuda"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left",
                                                       trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=_DTYPES[self.dtype_name], trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.eos_ids = self._eos_ids()
        self.pad_id = int(self.tokenizer.pad_token_id)
        if max_model_len:
            self.max_model_len: int | None = int(max_model_len)
            self._limit_setting = "teacher.max_new_tokens / max_model_len"
        else:
            self.max_model_len = getattr(self.model.config, "max_position_embeddings", None)
            self._limit_setting = "teacher.max_new_tokens / the model's max_position_embeddings"
        self._tok_lock = threading.Lock()    # the Rust tokenizer is not safe to share
        self._model_lock = threading.Lock()  # one generate at a time (sync and async paths)
        self._executor: ThreadPoolExecutor | None = None
        self._queues: dict[asyncio.AbstractEventLoop, deque[tuple[_Prepared, asyncio.Future]]]
        self._queues = {}
        self._runners: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}

    # -- checks before a request may join a batch -------------------------------------------

    def _prepare(self, request: ChatRequest) -> _Prepared | GenerationResult:
        """Tokenize with the chat template; an error or over-long result if it cannot run."""
        try:
            with self._tok_lock:
                text = self.tokenizer.apply_chat_template(
                    request.messages, tokenize=False, add_generation_prompt=True)
                ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception as exc:  # noqa: BLE001 - any template/tokenizer failure is a reject
            return failed(TOKENIZER_ERROR, f"{type(exc).__name__}: {exc}")
        if not ids:
            return failed(TOKENIZER_ERROR, "the chat template produced an empty prompt")
        max_new = max(0, int(request.sampling.max_new_tokens))
        if self.max_model_len is not None:
            refused = too_long(len(ids), max_new, self.max_model_len, self._limit_setting)
            if refused is not None:
                return refused
        if max_new == 0:
            return GenerationResult("", len(ids), 0, "length")
        return _Prepared(request, ids)

    # -- the blocking path -------------------------------------------------------------------

    def generate(self, requests: list[ChatRequest]) -> list[GenerationResult]:
        """Answer ``requests`` in order, up to ``max_batch`` of them per ``model.generate``."""
        results: list[GenerationResult | None] = [None] * len(requests)
        ready: list[tuple[int, _Prepared]] = []
        for i, req in enumerate(requests):
            prep = self._prepare(req)
            if isinstance(prep, GenerationResult):
                results[i] = prep
            else:
                ready.append((i, prep))
        for start in range(0, len(ready), self.max_batch):
            chunk = ready[start : start + self.max_batch]
            outs = self._run_batch([p for _, p in chunk])
            for (i, _), out in zip(chunk, outs, strict=True):
                results[i] = out
        return [r for r in results if r is not None]

    def _run_batch(self, batch: list[_Prepared]) -> list[GenerationResult]:
        """One ``model.generate`` over ``batch``; an exception fails every request of it."""
        try:
            with self._model_lock:
                return self._generate_batch(batch)
        except Exception as exc:  # noqa: BLE001 - the batch fails, the engine goes on
            log.exception("transformers generate failed for a batch of %d", len(batch))
            detail = f"{type(exc).__name__}: {exc}"
            return [failed(ENGINE_ERROR, detail, len(p.ids)) for p in batch]

    @torch.inference_mode()
    def _generate_batch(self, batch: list[_Prepared]) -> list[GenerationResult]:
        prompt_len = max(len(p.ids) for p in batch)
        input_ids = torch.full((len(batch), prompt_len), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), prompt_len), dtype=torch.long)
        for row, p in enumerate(batch):
            input_ids[row, prompt_len - len(p.ids) :] = torch.tensor(p.ids, dtype=torch.long)
            attention[row, prompt_len - len(p.ids) :] = 1
        samplings = [p.request.sampling for p in batch]
        max_new = [int(s.max_new_tokens) for s in samplings]
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max(max_new),
            logits_processor=[RowSampler(samplings, self.eos_ids, prompt_len, self.device)],
            stopping_criteria=[RowLimits(max_new, prompt_len, self.device)],
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )
        new = out[:, prompt_len:].tolist()
        eos = set(self.eos_ids)
        results = []
        for p, row, limit in zip(batch, new, max_new, strict=True):
            row = row[:limit]
            n, finish = len(row), "length"
            for j, t in enumerate(row):
                if t in eos:
                    n, finish = j + 1, "stop"
                    break
            with self._tok_lock:
                text = self.tokenizer.decode(row[: n - 1 if finish == "stop" else n],
                                             skip_special_tokens=True)
            results.append(GenerationResult(text.strip(), len(p.ids), n, finish))
        return results

    # -- the async path: a dynamic batcher ---------------------------------------------------

    async def agenerate(self, request: ChatRequest) -> GenerationResult:
        """Answer one request; concurrent calls are batched (up to ``max_batch`` a batch)."""
        prep = self._prepare(request)
        if isinstance(prep, GenerationResult):
            return prep
        loop = asyncio.get_running_loop()
        future: asyncio.Future[GenerationResult] = loop.create_future()
        self._queues.setdefault(loop, deque()).append((prep, future))
        runner = self._runners.get(loop)
        if runner is None or runner.done():
            self._runners[loop] = loop.create_task(self._drain(loop))
        return await future

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run queued requests, a batch at a time, until the queue is empty."""
        queue = self._queues[loop]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="hf-generate")
        while queue:
            if len(queue) < self.max_batch and self.batch_wait_s > 0:
                await asyncio.sleep(self.batch_wait_s)  # let a batch fill
            items = []
            while queue and len(items) < self.max_batch:
                prep, fut = queue.popleft()
                if not fut.done():  # skip cancelled callers
                    items.append((prep, fut))
            if not items:
                continue
            try:
                outs = await loop.run_in_executor(
                    self._executor, self._run_batch, [p for p, _ in items])
            except Exception as exc:  # noqa: BLE001 - e.g. the executor was shut down
                outs = [failed(ENGINE_ERROR, f"{type(exc).__name__}: {exc}", len(p.ids))
                        for p, _ in items]
            for (_, fut), res in zip(items, outs, strict=True):
                if not fut.done():
                    fut.set_result(res)
        self._queues.pop(loop, None)
        self._runners.pop(loop, None)

    # -- misc --------------------------------------------------------------------------------

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return [int(i) for i in ids if i is not None] or [int(self.tokenizer.eos_token_id)]

    def close(self) -> None:
        """Stop the worker thread and free the model."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if hasattr(self, "model"):
            del self.model
