"""Preference losses as pure functions over per-example summed log-probabilities.

Every loss takes 1-D float tensors of shape ``[B]``: the summed log-probability of the response
tokens under the policy (``policy_chosen``, ``policy_rejected``) and under the frozen reference
model (``ref_chosen``, ``ref_rejected``); NLL terms also take the number of response tokens
(``chosen_tokens``) so that the NLL is averaged per token. Each returns a :class:`LossOutput`
with *per-example* losses (the caller takes the mean) and the detached implicit rewards
``beta * (policy - ref)``. The pair losses take the four tensors in the order above (or by
keyword) and their options by keyword; ``sft_nll`` takes ``(policy_chosen, chosen_tokens)``, so a
caller that dispatches through :data:`LOSSES` should pass everything by keyword.

:data:`LOSSES` is the one place where a config name (``"dpo"``, ``"ipo"``, ``"slic"``, ``"sft"``,
``"dpo_nll"``) is mapped to a function; the caller binds the loss-specific options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossOutput:
    """Per-example losses ``[B]`` and detached implicit rewards ``[B]`` for both responses."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def _rewards(policy: Tensor, ref: Tensor | None, beta: float) -> Tensor:
    """Detached implicit reward ``beta * (policy - ref)``; without a reference, ``beta * policy``
    (the reference log-prob is taken as 0, i.e. a scaled log-likelihood)."""
    policy = policy.detach()
    return beta * (policy if ref is None else policy - ref.detach())


def _per_token(logps: Tensor, tokens: Tensor) -> Tensor:
    """``logps / tokens``, with the token count clamped to at least 1 (empty responses)."""
    return logps / tokens.to(logps.dtype).clamp(min=1)


def _log_ratio_margin(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> Tensor:
    """``h = (log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))``."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_sigmoid(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7: ``-log sigmoid(beta * h)`` with
    ``h = (log pi(y+)/ref(y+)) - (log pi(y-)/ref(y-))`` on summed log-probs.

    With ``label_smoothing = eps > 0`` this is conservative DPO (cDPO; Mitchell 2023, "A note on
    DPO with noisy preferences & relationship to IPO"), which assumes each label is flipped with
    probability eps: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logits = beta * _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(
        losses=losses,
        chosen_rewards=_rewards(policy_chosen, ref_chosen, beta),
        rejected_rewards=_rewards(policy_rejected, ref_rejected, beta),
    )


def ipo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    average_log_probs: bool = False,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> LossOutput:
    """IPO, Azar et al. 2023 (arXiv 2310.12036), Eq. 17: ``(h - 1 / (2 beta))^2``, where ``beta``
    is the paper's regularisation strength tau and ``h`` the log-likelihood-ratio margin.

    By default ``h`` is computed on *summed* log-probs, exactly the paper's form (``h`` is a log
    ratio of whole-sequence probabilities). With ``average_log_probs=True`` every log-prob is first
    divided by its response's token count (``chosen_tokens`` / ``rejected_tokens``), the
    length-normalised variant TRL uses; the rewards are then reported on that per-token scale too.
    """
    if beta <= 0:
        raise ValueError(f"IPO needs beta > 0, got {beta}")
    if average_log_probs:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("average_log_probs=True needs chosen_tokens and rejected_tokens")
        policy_chosen = _per_token(policy_chosen, chosen_tokens)
        ref_chosen = _per_token(ref_chosen, chosen_tokens)
        policy_rejected = _per_token(policy_rejected, rejected_tokens)
        ref_rejected = _per_token(ref_rejected, rejected_tokens)
    h = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return LossOutput(
        losses=(h - 1.0 / (2.0 * beta)) ** 2,
        chosen_rewards=_rewards(policy_chosen, ref_chosen, beta),
        rejected_rewards=_rewards(policy_rejected, ref_rejected, beta),
    )


def slic_hinge(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    beta: float = 0.1,
    delta: float = 1.0,
    reg_weight: float = 0.0,
    chosen_tokens: Tensor | None = None,
) -> LossOutput:
    """SLiC-HF calibration loss, Zhao et al. 2023 (arXiv 2305.10425), Eq. 1-2, as used for pair
    training in APC (Xu et al. 2023, arXiv 2310.02263):
    ``max(0, delta - log pi(y+) + log pi(y-)) + reg_weight * (-log pi(y+))``.

    The regulariser is the NLL of the chosen (target) response, averaged per token when
    ``chosen_tokens`` is given, else summed. The loss needs no reference model; ``beta`` only
    scales the reported rewards, which are ``beta * (policy - ref)`` when reference log-probs are
    given and ``beta * policy`` otherwise.
    """
    losses = torch.clamp(delta - policy_chosen + policy_rejected, min=0.0)
    if reg_weight:
        nll = -policy_chosen if chosen_tokens is None else -_per_token(policy_chosen, chosen_tokens)
        losses = losses + reg_weight * nll
    return LossOutput(
        losses=losses,
        chosen_rewards=_rewards(policy_chosen, ref_chosen, beta),
        rejected_rewards=_rewards(policy_rejected, ref_rejected, beta),
    )


def sft_nll(
    policy_chosen: Tensor,
    chosen_tokens: Tensor,
    *,
    policy_rejected: Tensor | None = None,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    beta: float = 0.1,
) -> LossOutput:
    """Supervised fine-tuning on the chosen response: ``-log pi(y+) / |y+|`` (per-token NLL).

    The other arguments only feed the reported rewards (``beta * (policy - ref)``, or
    ``beta * policy`` without a reference); without ``policy_rejected`` the rejected rewards are
    NaN, and so are the accuracy and margin in :func:`reward_metrics`.
    """
    rejected_rewards = (
        torch.full_like(policy_chosen.detach(), float("nan"))
        if policy_rejected is None
        else _rewards(policy_rejected, ref_rejected, beta)
    )
    return LossOutput(
        losses=-_per_token(policy_chosen, chosen_tokens),
        chosen_rewards=_rewards(policy_chosen, ref_chosen, beta),
        rejected_rewards=rejected_rewards,
    )


def dpo_nll(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    nll_weight: float,
    chosen_tokens: Tensor,
) -> LossOutput:
    """DPO plus a weighted per-token NLL on the chosen response, as in RPO (Pang et al. 2024,
    "Iterative Reasoning Preference Optimization", arXiv 2404.19733), Eq. 1:
    ``-log sigmoid(beta h) + nll_weight * (-log pi(y+) / |y+|)``."""
    dpo = dpo_sigmoid(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        beta=beta,
    )
    nll = -_per_token(policy_chosen, chosen_tokens)
    return LossOutput(
        losses=dpo.losses + nll_weight * nll,
        chosen_rewards=dpo.chosen_rewards,
        rejected_rewards=dpo.rejected_rewards,
    )


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "dpo": dpo_sigmoid,
    "ipo": ipo,
    "slic": slic_hinge,
    "sft": sft_nll,
    "dpo_nll": dpo_nll,
}


def reward_metrics(out: LossOutput) -> dict[str, float]:
    """Batch means: loss, chosen/rejected reward, reward accuracy (fraction of pairs with
    chosen reward > rejected reward) and margin (chosen - rejected reward). NaN rewards give NaN
    accuracy and margin."""
    chosen = out.chosen_rewards.detach().float()
    rejected = out.rejected_rewards.detach().float()
    margin = chosen - rejected
    correct = torch.where(margin.isnan(), margin, (margin > 0).float())
    return {
        "loss": out.losses.detach().float().mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracy": correct.mean().item(),
        "rewards/margin": margin.mean().item(),
    }


def sequence_logprobs(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example summed log-probs of ``labels`` under ``logits`` and the number of counted tokens.

    Shapes: ``logits [B, T, V]``, ``labels [B, T]``, ``loss_mask [B, T]`` (bool or 0/1). No shift
    is applied here: ``logits[:, t]`` must already be the prediction for ``labels[:, t]`` (for a
    causal LM the caller passes ``logits[:, :-1]`` with ``labels[:, 1:]``). Masked positions
    contribute nothing and their labels may hold anything (e.g. -100). The log-softmax runs in at
    least float32, so bf16/fp16 logits are upcast; returns ``(summed_logps [B] float32 or wider,
    num_tokens [B] int64)``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(
            f"expected logits [B,T,V] and labels/loss_mask [B,T]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(loss_mask.shape)}"
        )
    mask = loss_mask.bool()
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels)).long()
    token_logps = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    token_logps = torch.where(mask, token_logps, torch.zeros_like(token_logps))
    return token_logps.sum(-1), mask.sum(-1)
