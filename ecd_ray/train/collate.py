"""Tokenise PAIRS rows with the model's chat template and collate them into one DPO batch.

Each pair becomes two token sequences that share a prompt: ``prompt + chosen`` and
``prompt + rejected``. The prompt is the chat template applied to the user turn(s) with the
generation prompt (``<|im_start|>assistant\\n`` for SmolLM2); the response is everything the
template renders after it, up to and including the end-of-turn token (``<|im_end|>``), so the
model is trained to stop. Whitespace the template puts after the end-of-turn token is dropped.

Two batch layouts (:func:`collate`), which give the same log-probs up to float rounding:

- ``padded`` (:func:`collate_pairs`) stacks chosen rows (``0..B-1``) above rejected rows
  (``B..2B-1``), each padded to the longest, so that one forward pass scores both (what TRL's
  DPOTrainer does);
- ``shared_prompt`` (:func:`collate_shared_prompt`, the trainer's default where the model
  allows it) puts each pair in one row, ``prompt + chosen + rejected``, with a 4-D attention
  mask that keeps the two answers apart: the prompt is computed once, and a short answer is
  not padded to its partner's length. On the demo's pairs it runs about 0.65x the tokens.

:func:`concatenated_logprobs` runs the pass. :func:`bucket_batches`
groups pairs of similar length to cut padding; :func:`stage_batches` does it within each
curriculum stage, easy stages first.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ecd_ray.train.losses import sequence_logprobs

Messages = Sequence[Mapping[str, str]]

# Special tokens that close a chat turn in common templates (besides the tokenizer's eos).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass(frozen=True)
class CollateConfig:
    """Token budgets. The prompt is cut to ``max_prompt_tokens`` on the ``truncation`` side
    (``keep_end`` keeps its last tokens, as TRL does); the response is then cut at its end so
    that prompt + response fits ``max_length``."""

    max_prompt_tokens: int = 512
    max_length: int = 1024
    truncation: Literal["keep_end", "keep_start"] = "keep_end"

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.max_prompt_tokens >= self.max_length:
            raise ValueError(
                f"max_prompt_tokens ({self.max_prompt_tokens}) must be < max_length "
                f"({self.max_length}) to leave room for the response: lower max_prompt_tokens "
                "or raise max_length"
            )
        if self.truncation not in ("keep_end", "keep_start"):
            raise ValueError(
                f"truncation must be 'keep_end' or 'keep_start', got {self.truncation!r}"
            )


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids. ``*_mask`` is 1 on response tokens (including the
    end-of-turn token) and 0 on the prompt; it is aligned with ``*_ids`` (not yet shifted)."""

    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    prompt_len: int
    prompt_truncated: bool = False
    response_truncated: bool = False
    template_fallback: bool = False  # the template broke the prompt-prefix property

    @property
    def length(self) -> int:
        """The longer of the two sequences (what the pair costs in a padded batch)."""
        return max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def shared_length(self) -> int:
        """prompt + chosen response + rejected response: the pair's row in the shared-prompt
        layout (:func:`collate_shared_prompt`)."""
        return len(self.chosen_ids) + len(self.rejected_ids) - self.prompt_len

    @property
    def sequence_tokens(self) -> int:
        """prompt + chosen plus prompt + rejected: the pair's tokens as a DPO trainer that
        scores the two sequences separately sees them (the unit of the tokens/s figures)."""
        return len(self.chosen_ids) + len(self.rejected_ids)

    def row_length(self, layout: str) -> int:
        """What the pair costs in a batch of ``layout``."""
        return self.shared_length if layout == "shared_prompt" else self.length


@dataclass(frozen=True)
class _Response:
    ids: list[int]
    fallback: bool


def _render(tokenizer: Any, messages: Messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    # the rendered template already holds its special tokens (bos included where it has one)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Ids that close an assistant turn: the tokenizer's eos plus known end-of-turn specials."""
    added = tokenizer.get_added_vocab()
    ids = {added[name] for name in END_OF_TURN_TOKENS if name in added}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _trim_after_end_of_turn(tokenizer: Any, ids: list[int], eot: set[int]) -> list[int]:
    """Drop whitespace after the last end-of-turn token; append eos if the template adds none."""
    last = max((i for i, t in enumerate(ids) if t in eot), default=None)
    if last is None:
        return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    if tokenizer.decode(ids[last + 1 :]).strip() == "":
        return ids[: last + 1]
    return ids


def _fallback_response(
    tokenizer: Any, response: Messages, full_text: str, eot: set[int]
) -> list[int]:
    """Response ids tokenised on their own, followed by what the template renders after the
    last response message (its end-of-turn tokens), or the eos if that cannot be found."""
    content = "".join(m["content"] for m in response)
    at = full_text.rfind(response[-1]["content"]) if response[-1]["content"] else -1
    suffix = full_text[at + len(response[-1]["content"]) :] if at >= 0 else ""
    suffix_ids = _encode(tokenizer, suffix) if suffix else []
    return _trim_after_end_of_turn(tokenizer, _encode(tokenizer, content) + suffix_ids, eot)


def _response_ids(
    tokenizer: Any, prompt: Messages, prompt_ids: list[int], response: Messages, eot: set[int]
) -> _Response:
    full_text = _render(tokenizer, [*prompt, *response], generation_prompt=False)
    full_ids = _encode(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        tail = _trim_after_end_of_turn(tokenizer, full_ids[len(prompt_ids) :], eot)
        return _Response(tail, fallback=False)
    return _Response(_fallback_response(tokenizer, response, full_text, eot), fallback=True)


def _truncate_prompt(ids: list[int], cfg: CollateConfig) -> tuple[list[int], bool]:
    if len(ids) <= cfg.max_prompt_tokens:
        return ids, False
    keep = cfg.max_prompt_tokens
    return (ids[-keep:] if cfg.truncation == "keep_end" else ids[:keep]), True


def _join(
    prompt_ids: list[int], response_ids: list[int], max_length: int
) -> tuple[list[int], list[int], bool]:
    """``(ids, mask, truncated)`` for prompt + response, the response cut to fit max_length."""
    room = max_length - len(prompt_ids)
    kept = response_ids[:room]
    ids = prompt_ids + kept
    return ids, [0] * len(prompt_ids) + [1] * len(kept), len(kept) < len(response_ids)


def tokenize_pair(
    tokenizer: Any,
    prompt_messages: Messages,
    chosen_messages: Messages,
    rejected_messages: Messages,
    cfg: CollateConfig | None = None,
) -> TokenizedPair:
    """Tokenise one pair with the tokenizer's chat template (see the module docstring)."""
    cfg = cfg or CollateConfig()
    if not chosen_messages or not rejected_messages:
        raise ValueError("chosen and rejected must each hold at least one message")
    eot = end_of_turn_ids(tokenizer)
    full_prompt = _encode(tokenizer, _render(tokenizer, prompt_messages, generation_prompt=True))
    chosen = _response_ids(tokenizer, prompt_messages, full_prompt, chosen_messages, eot)
    rejected = _response_ids(tokenizer, prompt_messages, full_prompt, rejected_messages, eot)
    prompt_ids, prompt_cut = _truncate_prompt(full_prompt, cfg)
    c_ids, c_mask, c_cut = _join(prompt_ids, chosen.ids, cfg.max_length)
    r_ids, r_mask, r_cut = _join(prompt_ids, rejected.ids, cfg.max_length)
    return TokenizedPair(
        chosen_ids=c_ids,
        chosen_mask=c_mask,
        rejected_ids=r_ids,
        rejected_mask=r_mask,
        prompt_len=len(prompt_ids),
        prompt_truncated=prompt_cut,
        response_truncated=c_cut or r_cut,
        template_fallback=chosen.fallback or rejected.fallback,
    )


def tokenize_table_rows(
    tokenizer: Any, rows: Iterable[Mapping[str, Any]], cfg: CollateConfig | None = None
) -> list[TokenizedPair]:
    """:func:`tokenize_pair` over PAIRS rows (dicts with ``prompt``, ``chosen``, ``rejected``)."""
    return [
        tokenize_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"], cfg)
        for row in rows
    ]


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id (padding is masked, so its value is irrelevant)."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    raise ValueError("the tokenizer has neither a pad nor an eos token; pass pad_id explicitly")


def _pad(rows: list[list[int]], value: int, width: int) -> Tensor:
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, Tensor]:
    """One right-padded batch of ``2B`` rows: chosen rows ``0..B-1``, rejected rows ``B..2B-1``.

    Returns ``input_ids`` and ``attention_mask`` ``[2B, T]``; ``labels = input_ids[:, 1:]`` and
    ``loss_mask`` ``[2B, T-1]``, already shifted so that the caller pairs them with
    ``logits[:, :-1]`` (position t of ``labels`` is predicted by logits at t); ``num_tokens``
    ``[2B]``, the response tokens counted per row. Padding has zero attention and loss mask.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    ids = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    width = max(len(r) for r in ids)
    input_ids = _pad(ids, pad_id, width)
    attention_mask = _pad([[1] * len(r) for r in ids], 0, width)
    loss_mask = _pad(masks, 0, width)[:, 1:]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids[:, 1:],
        "loss_mask": loss_mask,
        "num_tokens": loss_mask.sum(-1),
        "sequence_tokens": attention_mask.sum(),
    }


# Where a token sits in a shared-prompt row (padding last).
_PROMPT, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, 3


def collate_shared_prompt(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, Tensor]:
    """One right-padded batch of ``B`` rows, one per pair, each ``prompt + chosen response +
    rejected response``: the prompt is computed once for both answers instead of twice.

    Each token sees what it would see in its own sequence, and nothing else: a 4-D boolean
    ``attention_mask [B, 1, T, T]`` is causal, except that rejected tokens do not see the
    chosen ones, and ``position_ids`` restart the rejected response right after the prompt.
    So the hidden state of every response token is that of the separate ``prompt + chosen``
    or ``prompt + rejected`` sequence (up to float rounding), and the scores equal
    :func:`collate_pairs`' (tests/test_collate.py). The first token of each response is
    predicted from the prompt's last position, which both share.

    The scored tokens are listed flat: ``token_row``/``token_pos`` (the position whose hidden
    state predicts the token), ``token_id``, and ``token_slot`` (``i`` for pair ``i``'s chosen
    response, ``B + i`` for its rejected one). ``num_tokens [2B]`` and ``sequence_tokens``
    (prompt + chosen plus prompt + rejected, as :func:`collate_pairs` counts) as there.
    Padding positions see only themselves.
    """
    if not pairs:
        raise ValueError("collate_shared_prompt needs at least one pair")
    b = len(pairs)
    width = max(p.shared_length for p in pairs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    segment = torch.full((b, width), _PAD, dtype=torch.long)
    rows: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    slots: list[int] = []
    for i, p in enumerate(pairs):
        n = p.prompt_len
        if n < 1 or p.chosen_ids[:n] != p.rejected_ids[:n]:
            raise ValueError(f"pair {i}: chosen and rejected do not share a prompt of "
                             f"{n} tokens; use layout=padded")
        chosen, rejected = p.chosen_ids[n:], p.rejected_ids[n:]
        c, r = len(chosen), len(rejected)
        ids[i, : n + c + r] = torch.tensor(p.chosen_ids + rejected, dtype=torch.long)
        positions[i, : n + c] = torch.arange(n + c)
        positions[i, n + c : n + c + r] = torch.arange(n, n + r)
        segment[i, :n], segment[i, n : n + c], segment[i, n + c : n + c + r] = (
            _PROMPT, _CHOSEN, _REJECTED)
        # chosen token k sits at n + k and is predicted from n + k - 1; rejected token k sits
        # at n + c + k and is predicted from n + c + k - 1, except k = 0: from the prompt's end
        rows += [i] * (c + r)
        pos += list(range(n - 1, n + c - 1))
        pos += ([n - 1] + list(range(n + c, n + c + r - 1))) if r else []
        labels += chosen + rejected
        slots += [i] * c + [b + i] * r
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    mask = causal & ~((seg_q == _REJECTED) & (seg_k == _CHOSEN)) & (seg_q != _PAD) & \
        (seg_k != _PAD)
    mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves
    slot = torch.tensor(slots, dtype=torch.long)
    return {
        "input_ids": ids,
        "position_ids": positions,
        "attention_mask": mask[:, None],
        "token_row": torch.tensor(rows, dtype=torch.long),
        "token_pos": torch.tensor(pos, dtype=torch.long),
        "token_id": torch.tensor(labels, dtype=torch.long),
        "token_slot": slot,
        "num_tokens": torch.bincount(slot, minlength=2 * b),
        "sequence_tokens": torch.tensor(sum(p.sequence_tokens for p in pairs)),
    }


LAYOUTS = ("shared_prompt", "padded")


def collate(pairs: Sequence[TokenizedPair], pad_id: int, layout: str) -> dict[str, Tensor]:
    """:func:`collate_shared_prompt` or :func:`collate_pairs`, by ``layout``."""
    if layout == "shared_prompt":
        return collate_shared_prompt(pairs, pad_id)
    if layout == "padded":
        return collate_pairs(pairs, pad_id)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def shared_prompt_problem(model_config: Any) -> str | None:
    """Why a model cannot take the shared-prompt layout (its custom 4-D mask), or None.

    FlashAttention kernels take no arbitrary mask, and a sliding-window layer would get the
    full causal mask instead of its window, so those models use the padded layout."""
    impl = getattr(model_config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return f"its attention implementation {impl!r} takes no custom 4-D mask"
    window = getattr(model_config, "sliding_window", None)
    types = getattr(model_config, "layer_types", None) or []
    if window or any("sliding" in str(t) for t in types):
        return "it has sliding-window attention layers, which a custom 4-D mask would override"
    return None


def resolve_layout(requested: str, model_config: Any) -> str:
    """The batch layout to use: ``auto`` is shared_prompt where the model takes it."""
    if requested == "padded":
        return "padded"
    problem = shared_prompt_problem(model_config)
    if requested == "shared_prompt" and problem:
        raise ValueError(f"layout=shared_prompt: the model cannot use it: {problem}; use "
                         "layout=padded or auto")
    if requested not in ("shared_prompt", "auto"):
        raise ValueError(f"layout must be auto, {' or '.join(LAYOUTS)}, got {requested!r}")
    return "padded" if problem else "shared_prompt"


# Response tokens per slice of the chunked log-prob computation: one slice's fp32 logits are
# chunk x vocab x 4 bytes (200 MB at 1024 tokens and SmolLM2's 49k vocabulary, 525 MB at 128k).
DEFAULT_LOGPROB_CHUNK = 1024


def concatenated_logprobs(
    model: torch.nn.Module, batch: Mapping[str, Tensor], *,
    chunk: int | None = DEFAULT_LOGPROB_CHUNK,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward pass of a causal LM over a :func:`collate_pairs` or
    :func:`collate_shared_prompt` batch (already on the model's device); returns
    ``(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens)``, each ``[B]``, the
    log-probs summed over response tokens.

    ``chunk=None`` computes the model's full logits and their fp32 log-softmax (the textbook
    way; memory ``rows x T x V x 4`` bytes, 2 GiB per sequence-batch at 128k x 2048).
    Otherwise (the default) the model returns only its final hidden states, and the LM head,
    log-softmax and gather run over the *response* positions only, ``chunk`` of them at a
    time, each slice under activation checkpointing: the full-vocabulary logits of the batch
    never exist, and backward keeps one slice's logits at a time. Under ZeRO-3 the head runs
    once over the response positions (see ``_chunked_logprobs``) and only the fp32 part is
    sliced. All of them agree to float rounding (tests/test_collate.py)."""
    if chunk is None and "token_slot" not in batch:
        out = model(**_model_inputs(model, batch))
        logps, tokens = sequence_logprobs(out.logits[:, :-1], batch["labels"], batch["loss_mask"])
    elif chunk is None:
        logits = model(**_model_inputs(model, batch)).logits
        rows, pos, labels, slots, n = _scored_tokens(batch)
        softcap = getattr(getattr(_hf_model(model), "config", None), "final_logit_softcapping",
                          None)
        logps, tokens = _slot_sums(_logits_logps(logits[rows, pos], labels, softcap), slots, n)
    else:
        logps, tokens = _chunked_logprobs(model, batch, chunk)
    b = logps.shape[0] // 2
    return logps[:b], logps[b:], tokens[:b], tokens[b:]


def _hf_model(model: torch.nn.Module) -> Any:
    """The transformers model inside a DeepSpeed engine or a DDP wrapper."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


def _model_inputs(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Any]:
    """The forward's keyword arguments for a batch of either layout."""
    mask = batch["attention_mask"]
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if mask.dim() == 4:  # shared-prompt: a boolean [B, 1, T, T] mask and explicit positions
        config = getattr(_hf_model(model), "config", None)
        if getattr(config, "_attn_implementation", "eager") != "sdpa":
            # eager attention adds the mask to the scores; the most negative finite value,
            # not -inf, so that no row is all -inf
            dtype = _hf_model(model).get_input_embeddings().weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min)
        inputs["position_ids"] = batch["position_ids"]
    inputs["attention_mask"] = mask
    return inputs


def _scored_tokens(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """``(rows, positions, labels, slots, slot_count)`` of the scored tokens: the hidden state
    at ``[rows, positions]`` predicts ``labels``, whose log-prob adds to output ``slots``."""
    if "token_slot" in batch:
        return (batch["token_row"], batch["token_pos"], batch["token_id"], batch["token_slot"],
                int(batch["num_tokens"].shape[0]))
    mask = batch["loss_mask"].bool()  # already shifted: position t predicts labels[:, t]
    where = mask.nonzero()
    return where[:, 0], where[:, 1], batch["labels"][mask], where[:, 0], int(mask.shape[0])


def _slot_sums(token_logps: Tensor, slots: Tensor, n: int) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(token_logps.dtype, torch.float32)
    sums = torch.zeros(n, dtype=dtype, device=token_logps.device)
    return sums.index_add(0, slots, token_logps.to(dtype)), torch.bincount(slots, minlength=n)


def _logits_logps(logits: Tensor, labels: Tensor, softcap: float | None) -> Tensor:
    logits = logits.float()
    if softcap:  # Gemma 2 style final-logit soft-capping, as the model's forward applies it
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _slice_logps(head: torch.nn.Module, hidden: Tensor, labels: Tensor, softcap: float | None
                 ) -> Tensor:
    return _logits_logps(head(hidden), labels, softcap)


def _chunked_logprobs(model: torch.nn.Module, batch: Mapping[str, Tensor], chunk: int
                      ) -> tuple[Tensor, Tensor]:
    from torch.utils.checkpoint import checkpoint

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    hf = _hf_model(model)
    head = hf.get_output_embeddings()
    if head is None or not hasattr(hf, "get_decoder"):
        raise ValueError(f"{type(hf).__name__} has no output embeddings/decoder to chunk; use "
                         "logprobs=full")
    captured: list[Tensor] = []

    def grab(_module: Any, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    # The forward goes through the wrapper (DeepSpeed's ZeRO-3 hooks, DDP) as usual; the
    # decoder's output (after its final norm) is taken by a hook, and the model's own LM head
    # is asked for one position only.
    handle = hf.get_decoder().register_forward_hook(grab)
    try:
        model(**_model_inputs(model, batch), logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder output, captured {len(captured)}")
    rows, pos, labels, slots, n = _scored_tokens(batch)
    selected, labels = captured[0][rows, pos], labels.long()
    softcap = getattr(getattr(hf, "config", None), "final_logit_softcapping", None)
    grad = torch.is_grad_enabled() and selected.requires_grad
    parts = []
    if hasattr(getattr(head, "weight", None), "ds_id"):
        # ZeRO-3 partitions the head: each call of it gathers its weight, a collective that
        # must run as many times on every rank, while the number of response tokens (so of
        # slices) differs between ranks. So the head runs once over all response tokens (still
        # never prompt or padding positions), and the fp32 log-softmax by slices.
        # torch.split, not slicing: its backward concatenates the slices' gradients once,
        # where each slice's backward would allocate a zero-filled [N, V] gradient
        for z, y in zip(torch.split(head(selected), chunk), torch.split(labels, chunk),
                        strict=True):
            parts.append(checkpoint(_logits_logps, z, y, softcap, use_reentrant=False) if grad
                         else _logits_logps(z, y, softcap))
    else:
        for h, y in zip(torch.split(selected, chunk), torch.split(labels, chunk), strict=True):
            parts.append(checkpoint(_slice_logps, head, h, y, softcap, use_reentrant=False)
                         if grad else _slice_logps(head, h, y, softcap))
    token_logps = torch.cat(parts) if parts else selected.new_zeros(0, dtype=torch.float32)
    return _slot_sums(token_logps, slots, n)


def bucket_batches(
    lengths: Sequence[int], batch_size: int, *, window: int = 50, seed: int = 0
) -> list[list[int]]:
    """Length-bucketed batches of indices: each run of ``window * batch_size`` consecutive items
    is sorted by length and cut into batches of ``batch_size`` (the very last may be smaller);
    the batch order is then shuffled with ``random.Random(seed)``. Deterministic per seed."""
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size and window must be >= 1, got {batch_size}, {window}")
    span = window * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(lengths), span):
        chunk = sorted(range(start, min(start + span, len(lengths))), key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    random.Random(seed).shuffle(batches)
    return batches


def _stage_seed(seed: int, stage: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:stage{stage}".encode()).digest()[:4], "little")


def stage_batches(
    stages: Sequence[int], lengths: Sequence[int], batch_size: int, *, window: int = 50,
    seed: int = 0
) -> list[list[int]]:
    """Length-bucketed batches that follow a curriculum: the items of each stage (ascending,
    0 = easiest) go through :func:`bucket_batches` on their own, with a seed derived from
    ``seed`` and the stage, and the stages' batches are concatenated. No batch mixes stages,
    the stage never decreases along the result, and the shuffle stays inside a stage."""
    if len(stages) != len(lengths):
        raise ValueError(f"{len(stages)} stages for {len(lengths)} lengths")
    by_stage: dict[int, list[int]] = {}
    for i, s in enumerate(stages):
        by_stage.setdefault(int(s), []).append(i)
    batches: list[list[int]] = []
    for s in sorted(by_stage):
        items = by_stage[s]
        local = bucket_batches([lengths[i] for i in items], batch_size, window=window,
                               seed=_stage_seed(seed, s))
        batches.extend([items[j] for j in batch] for batch in local)
    return batches
