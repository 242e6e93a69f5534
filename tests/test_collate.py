"""Chat-template tokenisation, truncation, the concatenated DPO batch and length bucketing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from ecd_ray.train.collate import (
    CollateConfig,
    TokenizedPair,
    bucket_batches,
    collate_pairs,
    collate_shared_prompt,
    concatenated_logprobs,
    pad_token_id,
    resolve_layout,
    tokenize_pair,
    tokenize_table_rows,
)
from ecd_ray.train.losses import sequence_logprobs

PROMPT = [{"role": "user", "content": "Write a haiku about rivers. Use no commas."}]
HAIKU = "Water finds its way\nstones remember every flood\nthe sea waits below"
CHOSEN = [{"role": "assistant", "content": HAIKU}]
REJECTED = [{"role": "assistant", "content": "Rivers, flowing, rivers."}]


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _masked_text(tok, ids: list[int], mask: list[int]) -> str:
    return tok.decode([t for t, m in zip(ids, mask, strict=True) if m])


def _prompt_ids(tok, prompt) -> list[int]:
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _row(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


# ---------------------------------------------------------------- config


def test_config_rejects_prompt_budget_not_below_max_length():
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        CollateConfig(max_prompt_tokens=64, max_length=64)
    with pytest.raises(ValueError, match="truncation"):
        CollateConfig(truncation="middle")  # type: ignore[arg-type]


# ---------------------------------------------------------------- tokenisation and loss mask


def test_mask_covers_exactly_the_response_and_end_of_turn(tok):
    pair = tokenize_pair(tok, PROMPT, CHOSEN, REJECTED, CollateConfig())
    assert not (pair.prompt_truncated or pair.response_truncated or pair.template_fallback)
    for ids, mask, msg in (
        (pair.chosen_ids, pair.chosen_mask, CHOSEN),
        (pair.rejected_ids, pair.rejected_mask, REJECTED),
    ):
        assert len(ids) == len(mask)
        assert _masked_text(tok, ids, mask) == msg[0]["content"] + "<|im_end|>"
        assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # trailing "\n" dropped
        # the prompt (with the generation header) is an unmasked prefix
        prompt_ids = _prompt_ids(tok, PROMPT)
        assert ids[: len(prompt_ids)] == prompt_ids
        assert not any(mask[: len(prompt_ids)])
        assert all(mask[len(prompt_ids) :])
        assert pair.prompt_len == len(prompt_ids)
        assert tok.decode(ids[: pair.prompt_len]).endswith("<|im_start|>assistant\n")


def test_template_that_breaks_the_prefix_falls_back(tok):
    # "assistant\n" + "\n\nx" tokenises "\n\n\n" as one token, so the prompt is no prefix
    odd = [{"role": "assistant", "content": "\n\nx"}]
    pair = tokenize_pair(tok, PROMPT, odd, REJECTED, CollateConfig())
    assert pair.template_fallback
    assert pair.chosen_ids[: pair.prompt_len] == _prompt_ids(tok, PROMPT)
    assert _masked_text(tok, pair.chosen_ids, pair.chosen_mask) == "\n\nx<|im_end|>"
    assert _masked_text(tok, pair.rejected_ids, pair.rejected_mask) == (
        REJECTED[0]["content"] + "<|im_end|>"
    )


def test_empty_response_still_learns_to_stop(tok):
    empty = [{"role": "assistant", "content": ""}]
    pair = tokenize_pair(tok, PROMPT, CHOSEN, empty, CollateConfig())
    assert _masked_text(tok, pair.rejected_ids, pair.rejected_mask) == "<|im_end|>"


def test_tokenize_table_rows(tok):
    rows = [_row("a?", "yes", "no"), _row("b?", "sure", "nope")]
    pairs = tokenize_table_rows(tok, rows, CollateConfig())
    assert [_masked_text(tok, p.chosen_ids, p.chosen_mask) for p in pairs] == [
        "yes<|im_end|>",
        "sure<|im_end|>",
    ]


# ---------------------------------------------------------------- truncation


@pytest.mark.parametrize("side", ["keep_end", "keep_start"])
def test_long_prompt_is_cut_per_policy(tok, side):
    prompt = [{"role": "user", "content": " ".join(f"w{i}" for i in range(300))}]
    cfg = CollateConfig(max_prompt_tokens=32, max_length=64, truncation=side)
    full = _prompt_ids(tok, prompt)
    pair = tokenize_pair(tok, prompt, CHOSEN, REJECTED, cfg)
    assert pair.prompt_truncated and pair.prompt_len == 32
    kept = full[-32:] if side == "keep_end" else full[:32]
    assert pair.chosen_ids[:32] == kept and pair.rejected_ids[:32] == kept
    head = tok.decode(pair.chosen_ids[:32])
    if side == "keep_end":
        assert head.endswith("<|im_start|>assistant\n")
    else:
        assert head.startswith("<|im_start|>system")
    assert len(pair.chosen_ids) <= 64 and len(pair.rejected_ids) <= 64


def test_long_response_is_cut_at_its_end(tok):
    long = [{"role": "assistant", "content": " ".join(f"r{i}" for i in range(200))}]
    cfg = CollateConfig(max_prompt_tokens=48, max_length=80)
    pair = tokenize_pair(tok, PROMPT, long, REJECTED, cfg)
    assert pair.response_truncated and not pair.prompt_truncated
    assert len(pair.chosen_ids) == 80 == len(pair.chosen_mask)
    assert sum(pair.chosen_mask) == 80 - pair.prompt_len
    text = _masked_text(tok, pair.chosen_ids, pair.chosen_mask)
    assert long[0]["content"].startswith(text) and "<|im_end|>" not in text
    # the short rejected response is untouched
    assert _masked_text(tok, pair.rejected_ids, pair.rejected_mask).endswith("<|im_end|>")


def test_lengths_never_exceed_max_length(tok):
    rng = random.Random(0)
    cfg = CollateConfig(max_prompt_tokens=24, max_length=40)

    def words(n: int) -> str:
        return " ".join("x" * rng.randint(1, 6) for _ in range(n))

    for _ in range(20):
        pair = tokenize_pair(
            tok,
            [{"role": "user", "content": words(rng.randint(1, 60))}],
            [{"role": "assistant", "content": words(rng.randint(0, 60))}],
            [{"role": "assistant", "content": words(rng.randint(0, 60))}],
            cfg,
        )
        assert pair.prompt_len <= 24
        assert max(len(pair.chosen_ids), len(pair.rejected_ids)) <= 40


# ---------------------------------------------------------------- collate


def _pairs(tok) -> list:
    rows = [
        _row("Name a colour.", "Blue.", "I cannot answer that question, sorry about it."),
        _row("Count to five in words, lowercase.", "one two three four five", "1 2 3 4 5"),
        _row("Say hi.", "hi", "Hello there! How may I help you today?"),
    ]
    return tokenize_table_rows(tok, rows, CollateConfig())


def test_collate_layout(tok):
    pairs = _pairs(tok)
    pad = pad_token_id(tok)
    batch = collate_pairs(pairs, pad)
    rows = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    width = max(map(len, rows))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (6, width)
    assert batch["labels"].shape == batch["loss_mask"].shape == (6, width - 1)
    assert torch.equal(batch["labels"], batch["input_ids"][:, 1:])
    for i, (ids, mask) in enumerate(zip(rows, masks, strict=True)):
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids  # chosen rows first, then rejected
        assert (batch["input_ids"][i, n:] == pad).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["loss_mask"][i].tolist() == mask[1:] + [0] * (width - n)
        assert not batch["loss_mask"][i, n - 1 :].any()  # padding is never counted
        assert batch["num_tokens"][i] == sum(mask)


def test_concatenated_logprobs_match_separate_unpadded_passes(tok, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    pairs = _pairs(tok)
    batch = collate_pairs(pairs, pad_token_id(tok))
    with torch.no_grad():
        got = concatenated_logprobs(model, batch)

        def single(ids: list[int], mask: list[int]) -> tuple[float, int]:
            x = torch.tensor([ids])
            logits = model(input_ids=x, use_cache=False).logits
            lp, n = sequence_logprobs(logits[:, :-1], x[:, 1:], torch.tensor([mask[1:]]))
            return lp.item(), n.item()

        chosen = [single(p.chosen_ids, p.chosen_mask) for p in pairs]
        rejected = [single(p.rejected_ids, p.rejected_mask) for p in pairs]
    for out, ref in zip(got, ([c[0] for c in chosen], [r[0] for r in rejected],
                              [c[1] for c in chosen], [r[1] for r in rejected]), strict=True):
        assert out.shape == (3,)
        torch.testing.assert_close(out.to(torch.float64), torch.tensor(ref, dtype=torch.float64),
                                   atol=1e-4, rtol=0)


def _logps_and_grads(model, batch, chunk):
    model.zero_grad(set_to_none=True)
    c, r, nc, nr = concatenated_logprobs(model, batch, chunk=chunk)
    (c.sum() - 0.5 * r.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return [t.detach() for t in (c, r, nc, nr)], grads


def _tiny(kind: str, vocab: int):
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

    torch.manual_seed(0)
    small = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    if kind == "gemma3":  # tied embeddings, extra norms (the second embedded model's family)
        cfg = Gemma3TextConfig(**small, sliding_window=16)
    else:  # gemma2: final-logit soft-capping, applied after the LM head
        cfg = Gemma2Config(**small, final_logit_softcapping=3.0, sliding_window=16)
    return AutoModelForCausalLM.from_config(cfg).float()


@pytest.mark.parametrize("which", ["tiny_llama", "gemma3", "gemma2_softcap"])
def test_chunked_logprobs_equal_the_full_computation(tok, tiny_model, which):
    """Values and gradients of the chunked path against full logits + fp32 log-softmax, to
    1e-5 in fp32, at chunk sizes that split responses mid-sequence and across rows."""
    from transformers import AutoModelForCausalLM

    if which == "tiny_llama":
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    else:
        model = _tiny(which.split("_")[0], vocab=len(tok))
    model.train()  # dropout is 0 in these configs; train mode is what the trainer runs
    batch = collate_pairs(_pairs(tok), pad_token_id(tok))
    want, want_grads = _logps_and_grads(model, batch, None)
    for chunk in (1, 5, 1024):
        got, grads = _logps_and_grads(model, batch, chunk)
        # per-token log-probs to 1e-5; the sums (around -100, where one fp32 ulp is 7.6e-6)
        # to 1e-5 plus 1e-7 relative
        torch.testing.assert_close(got[2], want[2], atol=0, rtol=0)
        torch.testing.assert_close(got[3], want[3], atol=0, rtol=0)
        for g, w, n in ((got[0], want[0], want[2]), (got[1], want[1], want[3])):
            torch.testing.assert_close(g.to(w.dtype) / n, w / n, atol=1e-5, rtol=0)
            torch.testing.assert_close(g.to(w.dtype), w, atol=1e-5, rtol=1e-7)
        assert grads.keys() == want_grads.keys()
        for name, w in want_grads.items():  # summation order differs: compare by norm
            rel = (grads[name] - w).norm() / w.norm().clamp(min=1e-12)
            assert rel < 1e-5, (chunk, name, float(rel))


def test_chunked_logprobs_never_build_the_batch_logits(tok, tiny_model):
    """The LM head sees one position per row in the forward, then at most ``chunk`` response
    positions per call: never the [2B, T, V] logits of the batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = collate_pairs(_pairs(tok), pad_token_id(tok))
    shapes: list[tuple[int, ...]] = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda _m, _a, out: shapes.append(tuple(out.shape)))
    try:
        c, r, _, _ = concatenated_logprobs(model, batch, chunk=4)
        (c.sum() + r.sum()).backward()
    finally:
        handle.remove()
    rows, width = batch["input_ids"].shape
    vocab = model.config.vocab_size
    assert shapes[0] == (rows, 1, vocab)
    response = int(batch["loss_mask"].sum())
    forward = shapes[1 : 1 + -(-response // 4)]
    assert [s[0] for s in forward] == [min(4, response - i) for i in range(0, response, 4)]
    assert all(len(s) == 2 and s[0] <= 4 for s in shapes[1:])  # recomputed slices in backward
    assert len(shapes) == 1 + 2 * len(forward)
    assert rows * width * vocab > 40 * 4 * vocab  # the full logits would have been far larger


# ---------------------------------------------------------------- bucketing


def _waste(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_bucket_batches_cover_every_index_once_deterministically():
    rng = random.Random(1)
    lengths = [rng.randint(10, 1000) for _ in range(1003)]
    batches = bucket_batches(lengths, 8, window=10, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert sorted(len(b) for b in batches)[0] == 1003 % 8 and sum(len(b) < 8 for b in batches) == 1
    assert batches == bucket_batches(lengths, 8, window=10, seed=3)
    assert batches != bucket_batches(lengths, 8, window=10, seed=4)
    assert bucket_batches([], 4) == []


def test_bucket_batches_are_length_homogeneous_within_a_window():
    rng = random.Random(2)
    lengths = [rng.randint(10, 1000) for _ in range(800)]
    window, size = 10, 8
    batches = bucket_batches(lengths, size, window=window, seed=0)
    for b in batches:  # a batch never straddles two windows and is sorted inside its window
        assert len({i // (window * size) for i in b}) == 1
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
    plain = [list(range(i, min(i + size, 800))) for i in range(0, 800, size)]
    assert _waste(batches, lengths) < 0.25 * _waste(plain, lengths)


def test_bucket_batches_rejects_bad_sizes():
    with pytest.raises(ValueError):
        bucket_batches([1, 2], 0)


# ---------------------------------------------------------------- shared-prompt layout


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_layout_equals_separate_sequences(tok, tiny_model, attn):
    """One row per pair (prompt + chosen + rejected, a 4-D mask) against the padded layout
    (two rows per pair), in value and gradient, chunked and full, to 1e-5 in fp32; and the
    rows hold fewer tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32,
                                                 attn_implementation=attn)
    model.train()
    pairs = _pairs(tok)
    pad = pad_token_id(tok)
    padded, shared = collate_pairs(pairs, pad), collate_shared_prompt(pairs, pad)
    assert shared["input_ids"].shape[0] == len(pairs)
    assert shared["input_ids"].numel() < padded["input_ids"].numel()
    assert int(shared["sequence_tokens"]) == int(padded["attention_mask"].sum())
    for chunk in (None, 5, 1024):
        want, want_grads = _logps_and_grads(model, padded, chunk)
        got, grads = _logps_and_grads(model, shared, chunk)
        torch.testing.assert_close(got[2], want[2], atol=0, rtol=0)
        torch.testing.assert_close(got[3], want[3], atol=0, rtol=0)
        for g, w, n in ((got[0], want[0], want[2]), (got[1], want[1], want[3])):
            torch.testing.assert_close(g / n, w / n, atol=1e-5, rtol=0)
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-7)
        assert grads.keys() == want_grads.keys()
        for name, w in want_grads.items():
            rel = (grads[name] - w).norm() / w.norm().clamp(min=1e-12)
            assert rel < 1e-5, (chunk, name, float(rel))


def test_shared_prompt_mask_keeps_the_answers_apart(tok, tiny_model):
    """Rejected tokens must not see the chosen ones: with that one rule dropped from the mask
    the rejected log-probs change (so the equality test above can fail), the chosen ones not."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    batch = collate_shared_prompt(_pairs(tok), pad_token_id(tok))
    width = batch["input_ids"].shape[1]
    leaky = dict(batch)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    leaky["attention_mask"] = batch["attention_mask"] | (causal & batch["attention_mask"].any(-1,
                                                         keepdim=True))
    with torch.no_grad():
        c, r, _, _ = concatenated_logprobs(model, batch)
        lc, lr, _, _ = concatenated_logprobs(model, leaky)
    torch.testing.assert_close(lc, c, atol=1e-5, rtol=0)
    assert (lr - r).abs().max() > 1e-3


def test_shared_prompt_scores_the_tokens_of_each_answer(tok):
    pairs = _pairs(tok)
    batch = collate_shared_prompt(pairs, pad_token_id(tok))
    b = len(pairs)
    for i, p in enumerate(pairs):
        n = p.prompt_len
        ids, pos = batch["input_ids"][i].tolist(), batch["position_ids"][i].tolist()
        for slot, answer in ((i, p.chosen_ids[n:]), (b + i, p.rejected_ids[n:])):
            at = batch["token_slot"] == slot
            assert batch["token_id"][at].tolist() == answer
            assert (batch["token_row"][at] == i).all()
            # each answer token is predicted from the position before it in its own sequence
            before = [pos[t] for t in batch["token_pos"][at].tolist()]
            assert before == list(range(n - 1, n - 1 + len(answer)))
            assert [ids[t] for t in batch["token_pos"][at].tolist()][1:] == answer[:-1]
        assert int(batch["num_tokens"][i]) == len(p.chosen_ids) - n
    different = TokenizedPair([1, 2, 3], [0, 1, 1], [1, 9, 3], [0, 1, 1], prompt_len=2)
    with pytest.raises(ValueError, match="share a prompt"):
        collate_shared_prompt([different], 0)


def test_layout_auto_falls_back_where_a_custom_mask_would_be_wrong():
    from transformers import Gemma3TextConfig, LlamaConfig

    llama = LlamaConfig(num_hidden_layers=1)
    llama._attn_implementation = "sdpa"
    assert resolve_layout("auto", llama) == "shared_prompt"
    assert resolve_layout("padded", llama) == "padded"
    llama._attn_implementation = "flash_attention_2"
    assert resolve_layout("auto", llama) == "padded"
    with pytest.raises(ValueError, match="4-D mask"):
        resolve_layout("shared_prompt", llama)
    gemma = Gemma3TextConfig(num_hidden_layers=2, sliding_window=16)
    gemma._attn_implementation = "sdpa"
    assert resolve_layout("auto", gemma) == "padded"
    with pytest.raises(ValueError, match="sliding"):
        resolve_layout("shared_prompt", gemma)
