"""Preference losses: hand-worked values, gradients, sequence log-probs and reward metrics."""

from __future__ import annotations

import math

import pytest
import torch

from ecd_ray.train.losses import (
    LOSSES,
    LossOutput,
    dpo_nll,
    dpo_sigmoid,
    ipo,
    reward_metrics,
    sequence_logprobs,
    sft_nll,
    slic_hinge,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), by hand."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# Two pairs: h = (pc - rc) - (pr - rr) = (0.5) - (-0.5) = 1.0 and (-0.5) - (1.0) = -1.5
PC, PR, RC, RR = t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.5), t(-1.5, -2.0)
H = (1.0, -1.5)


# --- DPO / cDPO -----------------------------------------------------------------------------


def test_dpo_hand_values() -> None:
    beta = 0.5
    out = dpo_sigmoid(PC, PR, RC, RR, beta=beta)
    expected = [softplus(-beta * h) for h in H]  # -log sigmoid(beta h)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.losses[0].item() == pytest.approx(math.log1p(math.exp(-0.5)))
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, -0.25])  # 0.5 * (pc - rc)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.5])  # 0.5 * (pr - rr)


def test_cdpo_label_smoothing_hand_values() -> None:
    beta, eps = 0.5, 0.1
    out = dpo_sigmoid(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    expected = [(1 - eps) * softplus(-beta * h) + eps * softplus(beta * h) for h in H]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    # h = 0: the loss is log 2 whatever the smoothing
    zero = dpo_sigmoid(t(0.0), t(0.0), t(0.0), t(0.0), beta=beta, label_smoothing=eps)
    assert zero.losses.item() == pytest.approx(math.log(2))


def test_cdpo_rejects_bad_smoothing() -> None:
    with pytest.raises(ValueError):
        dpo_sigmoid(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_analytic_gradient(eps: float) -> None:
    beta = 0.7
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_sigmoid(pc, pr, RC, RR, beta=beta, label_smoothing=eps).losses.sum().backward()
    # d/dpc [-(1-eps) log s(bh) - eps log s(-bh)] = -beta ((1-eps) s(-bh) - eps s(bh))
    expected = [-beta * ((1 - eps) * sigmoid(-beta * h) - eps * sigmoid(beta * h)) for h in H]
    assert pc.grad.tolist() == pytest.approx(expected, rel=1e-12)
    assert pr.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-12)
    if eps == 0.0:
        assert pc.grad.tolist() == pytest.approx([-beta * sigmoid(-beta * h) for h in H])


# --- IPO ------------------------------------------------------------------------------------


def test_ipo_hand_values_target() -> None:
    beta = 0.25  # target 1 / (2 beta) = 2
    out = ipo(PC, PR, RC, RR, beta=beta)
    assert out.losses.tolist() == pytest.approx([(1.0 - 2.0) ** 2, (-1.5 - 2.0) ** 2])
    # at h = 1 / (2 beta) the loss is exactly zero
    at_target = ipo(t(2.0), t(0.0), t(0.0), t(0.0), beta=beta)
    assert at_target.losses.item() == 0.0


def test_ipo_average_log_probs() -> None:
    beta = 0.25
    pc, rc, pr, rr = t(-4.0), t(-8.0), t(-6.0), t(-4.0)
    ct, rt = torch.tensor([4]), torch.tensor([2])
    # summed: h = (-4 + 8) - (-6 + 4) = 6 -> (6 - 2)^2 = 16
    assert ipo(pc, pr, rc, rr, beta=beta).losses.item() == pytest.approx(16.0)
    # per token: h = (-1 + 2) - (-3 + 2) = 2 -> 0
    avg = ipo(pc, pr, rc, rr, beta=beta, average_log_probs=True, chosen_tokens=ct,
              rejected_tokens=rt)
    assert avg.losses.item() == pytest.approx(0.0)
    assert avg.chosen_rewards.item() == pytest.approx(0.25 * 1.0)
    assert avg.rejected_rewards.item() == pytest.approx(0.25 * -1.0)
    with pytest.raises(ValueError):
        ipo(pc, pr, rc, rr, beta=beta, average_log_probs=True)


# --- SLiC -----------------------------------------------------------------------------------


def test_slic_hinge_active_and_inactive() -> None:
    # pair 0: 1 - (-1) + (-1.5) = 0.5 > 0 (active); pair 1: 1 - (-1) + (-3) = -1 -> 0
    pc, pr = t(-1.0, -1.0).requires_grad_(), t(-1.5, -3.0).requires_grad_()
    out = slic_hinge(pc, pr, delta=1.0)
    assert out.losses.tolist() == pytest.approx([0.5, 0.0])
    out.losses.sum().backward()
    assert pc.grad.tolist() == [-1.0, 0.0]  # zero gradient once the margin exceeds delta
    assert pr.grad.tolist() == [1.0, 0.0]
    # no reference: rewards are beta * policy
    assert out.chosen_rewards.tolist() == pytest.approx([-0.1, -0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.15, -0.3])


def test_slic_regulariser_per_token_and_rewards_with_ref() -> None:
    pc, pr = t(-2.0, -8.0), t(-2.5, -20.0)
    tokens = torch.tensor([4, 8])
    # hinge: 1 + 2 - 2.5 = 0.5 and 1 + 8 - 20 < 0; NLL per token: 2 / 4 = 0.5 and 8 / 8 = 1
    out = slic_hinge(pc, pr, RC, RR, beta=0.5, delta=1.0, reg_weight=0.5, chosen_tokens=tokens)
    assert out.losses.tolist() == pytest.approx([0.5 + 0.5 * 0.5, 0.0 + 0.5 * 1.0])
    summed = slic_hinge(pc, pr, delta=1.0, reg_weight=0.5)  # no tokens: summed NLL
    assert summed.losses.tolist() == pytest.approx([0.5 + 0.5 * 2.0, 0.5 * 8.0])
    assert out.chosen_rewards.tolist() == pytest.approx([0.5 * (-2.0 + 1.5), 0.5 * (-8.0 + 2.5)])
    assert out.rejected_rewards.tolist() == pytest.approx([0.5 * (-2.5 + 1.5), 0.5 * (-20 + 2)])


# --- SFT and DPO + NLL ----------------------------------------------------------------------


def test_sft_nll_per_token() -> None:
    out = sft_nll(t(-6.0, -1.0), torch.tensor([3, 4]))
    assert out.losses.tolist() == pytest.approx([2.0, 0.25])
    assert out.chosen_rewards.tolist() == pytest.approx([-0.6, -0.1])
    assert torch.isnan(out.rejected_rewards).all()
    with_ref = sft_nll(PC, torch.tensor([1, 1]), policy_rejected=PR, ref_chosen=RC,
                       ref_rejected=RR, beta=1.0)
    assert with_ref.losses.tolist() == pytest.approx([1.0, 3.0])
    assert with_ref.chosen_rewards.tolist() == pytest.approx([0.5, -0.5])
    assert with_ref.rejected_rewards.tolist() == pytest.approx([-0.5, 1.0])


def test_dpo_nll_hand_values() -> None:
    beta, alpha = 0.5, 2.0
    tokens = torch.tensor([2, 6])
    out = dpo_nll(PC, PR, RC, RR, beta=beta, nll_weight=alpha, chosen_tokens=tokens)
    # NLL per token: 1 / 2 and 3 / 6
    expected = [softplus(-beta * H[0]) + alpha * 0.5, softplus(-beta * H[1]) + alpha * 0.5]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, -0.25])


# --- gradcheck (float64) w.r.t. the policy log-probs ---------------------------------------

_TOK_C, _TOK_R = torch.tensor([3, 5]), torch.tensor([2, 7])


def _slic(pc: torch.Tensor, pr: torch.Tensor) -> LossOutput:
    # at the gradcheck points the hinge is 0.5 (active) and -1 (inactive): away from the kink
    return slic_hinge(pc, pr, delta=1.0, reg_weight=0.3, chosen_tokens=_TOK_C)


GRAD_CASES = {
    "dpo": lambda pc, pr: dpo_sigmoid(pc, pr, RC, RR, beta=0.3),
    "cdpo": lambda pc, pr: dpo_sigmoid(pc, pr, RC, RR, beta=0.3, label_smoothing=0.1),
    "ipo": lambda pc, pr: ipo(pc, pr, RC, RR, beta=0.3),
    "ipo_avg": lambda pc, pr: ipo(pc, pr, RC, RR, beta=0.3, average_log_probs=True,
                                  chosen_tokens=_TOK_C, rejected_tokens=_TOK_R),
    "slic": _slic,
    "sft": lambda pc, pr: sft_nll(pc, _TOK_C, policy_rejected=pr),
    "dpo_nll": lambda pc, pr: dpo_nll(pc, pr, RC, RR, beta=0.3, nll_weight=0.5,
                                      chosen_tokens=_TOK_C),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradcheck(name: str) -> None:
    fn = GRAD_CASES[name]
    pc = t(-1.0, -1.0).requires_grad_()
    pr = t(-1.5, -3.0).requires_grad_()  # SLiC margins 0.5 (active) and -1 (inactive)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b).losses, (pc, pr))


def test_rewards_are_detached() -> None:
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    out = dpo_sigmoid(pc, pr, RC, RR, beta=0.1)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.losses.requires_grad


# --- dispatch -------------------------------------------------------------------------------


def test_losses_mapping_by_keyword() -> None:
    assert set(LOSSES) == {"dpo", "ipo", "slic", "sft", "dpo_nll"}
    options = {"dpo": {"beta": 0.1}, "ipo": {"beta": 0.1}, "slic": {"delta": 1.0},
               "sft": {}, "dpo_nll": {"beta": 0.1, "nll_weight": 1.0}}
    tensors = {"policy_chosen": PC, "policy_rejected": PR, "ref_chosen": RC, "ref_rejected": RR}
    for name, fn in LOSSES.items():
        kwargs = dict(tensors, **options[name])
        if name in ("sft", "dpo_nll"):
            kwargs["chosen_tokens"] = torch.tensor([2, 2])
        out = fn(**kwargs)
        assert isinstance(out, LossOutput) and out.losses.shape == (2,)


# --- reward_metrics -------------------------------------------------------------------------


def test_reward_metrics_hand_example() -> None:
    out = LossOutput(losses=t(1.0, 2.0, 3.0), chosen_rewards=t(1.0, 0.5, -1.0),
                     rejected_rewards=t(0.0, 1.0, -2.0))
    m = reward_metrics(out)
    assert m["loss"] == pytest.approx(2.0)
    assert m["rewards/chosen"] == pytest.approx(0.5 / 3)
    assert m["rewards/rejected"] == pytest.approx(-1.0 / 3)
    assert m["rewards/accuracy"] == pytest.approx(2.0 / 3)
    assert m["rewards/margin"] == pytest.approx((1.0 - 0.5 + 1.0) / 3)
    assert all(isinstance(v, float) for v in m.values())


def test_reward_metrics_nan_without_rejected() -> None:
    m = reward_metrics(sft_nll(t(-2.0), torch.tensor([2])))
    assert m["loss"] == pytest.approx(1.0)
    assert math.isnan(m["rewards/accuracy"]) and math.isnan(m["rewards/margin"])


# --- sequence_logprobs ----------------------------------------------------------------------


def _loop_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Direct per-token loop in plain Python floats."""
    totals = []
    for b in range(logits.shape[0]):
        total = 0.0
        for step in range(logits.shape[1]):
            if not mask[b, step]:
                continue
            row = [float(v) for v in logits[b, step]]
            top = max(row)
            lse = top + math.log(sum(math.exp(v - top) for v in row))
            total += row[int(labels[b, step])] - lse
        totals.append(total)
    return totals


def _random_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 6, 11, generator=gen) * 3
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    labels = torch.where(mask.bool(), labels, torch.full_like(labels, -100))
    return logits, labels, mask


def test_sequence_logprobs_matches_loop() -> None:
    logits, labels, mask = _random_batch()
    summed, count = sequence_logprobs(logits, labels, mask)
    assert summed.dtype == torch.float32 and summed.shape == (3,)
    assert count.tolist() == [4, 2, 0]
    assert summed.tolist() == pytest.approx(_loop_logprobs(logits, labels, mask), abs=1e-5)
    assert summed[2].item() == 0.0


def test_sequence_logprobs_masked_tokens_contribute_nothing() -> None:
    logits, labels, mask = _random_batch()
    summed, _ = sequence_logprobs(logits, labels, mask)
    noisy_logits = torch.where(mask.bool().unsqueeze(-1), logits, torch.randn_like(logits) * 50)
    noisy_labels = torch.where(mask.bool(), labels, torch.randint_like(labels, 0, 11))
    again, _ = sequence_logprobs(noisy_logits, noisy_labels, mask.bool())
    assert torch.equal(summed, again)
    logits.requires_grad_()
    sequence_logprobs(logits, labels, mask)[0].sum().backward()
    assert (logits.grad[~mask.bool()] == 0).all()


def test_sequence_logprobs_bf16_runs_in_float32() -> None:
    logits, labels, mask = _random_batch(seed=1)
    low = logits.to(torch.bfloat16)
    summed, _ = sequence_logprobs(low, labels, mask)
    assert summed.dtype == torch.float32
    assert summed.tolist() == pytest.approx(_loop_logprobs(low.float(), labels, mask), abs=1e-5)


def test_sequence_logprobs_gradcheck_and_shape_errors() -> None:
    logits, labels, mask = _random_batch()
    logits = logits[:, :, :5].double().requires_grad_()
    labels = labels.clamp(max=4)
    assert torch.autograd.gradcheck(lambda x: sequence_logprobs(x, labels, mask)[0], (logits,))
    with pytest.raises(ValueError):
        sequence_logprobs(logits, labels[:, :-1], mask)
