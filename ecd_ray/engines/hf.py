"""The ``transformers`` engine: batched ``generate`` on CPU or GPU; runs anywhere."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ecd_ray.engines.base import ChatRequest, GenerationResult, Sampling

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is fp32 on CPU (bit-reproducible, and bf16 gains little there) and bf16 on GPU."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return _DTYPES[name]


class TransformersEngine:
    """Chat generation with ``AutoModelForCausalLM.generate``, left-padded batches.

    Sampling is reproducible for a given batch: the torch RNG is seeded from the batch's
    request ids and sampling seeds before each ``generate`` call.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        max_batch: int = 16,
        threads: int | None = None,
        device: str | None = None,
        model_name: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model_name = model_name or str(model_dir)
        self.max_batch = max_batch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=pick_dtype(dtype, self.device)
        ).to(self.device)
        self.model.eval()

    def generate(self, requests: list[ChatRequest]) -> list[GenerationResult]:
        """Answer ``requests`` in order; requests with equal sampling settings share a batch."""
        results: dict[int, GenerationResult] = {}
        groups: dict[Sampling, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.sampling, []).append(i)
        for sampling, idx in groups.items():
            for start in range(0, len(idx), self.max_batch):
                chunk = idx[start : start + self.max_batch]
                outs = self._generate_batch([requests[i] for i in chunk], sampling)
                results.update(zip(chunk, outs, strict=True))
        return [results[i] for i in range(len(requests))]

    @torch.inference_mode()
    def _generate_batch(
        self, requests: list[ChatRequest], sampling: Sampling
    ) -> list[GenerationResult]:
        tok = self.tokenizer
        texts = [
            tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
            for r in requests
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.device)
        key = "|".join(f"{r.request_id}:{r.sampling.seed}" for r in requests)
        torch.manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        do_sample = sampling.temperature > 0
        out = self.model.generate(
            **enc,
            do_sample=do_sample,
            temperature=sampling.temperature if do_sample else None,
            top_p=sampling.top_p if do_sample else None,
            top_k=None,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens or None,
            pad_token_id=tok.pad_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        eos_ids = set(self._eos_ids())
        results = []
        for row, mask in zip(new.tolist(), enc["attention_mask"], strict=True):
            n, finish = len(row), "length"
            for j, t in enumerate(row):
                if t in eos_ids:
                    n, finish = j + 1, "stop"
                    break
            text = tok.decode(row[: n - 1 if finish == "stop" else n], skip_special_tokens=True)
            results.append(GenerationResult(text.strip(), int(mask.sum()), n, finish))
        return results

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return [i for i in ids if i is not None] or [self.tokenizer.eos_token_id]

    def close(self) -> None:
        del self.model
