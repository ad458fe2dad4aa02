"""Preference losses on sequence log-probabilities: DPO (sigmoid, IPO, hinge), SimPO, ORPO, KTO.

Inputs are per-sequence sums of completion-token log-probs (`CausalLMLoss.sequence_logps`) and
their token counts; every function returns per-example losses (summed by the caller, so gradient
accumulation normalises by the number of pairs of the whole step) and the implicit rewards that
TRL logs. With the log-ratios  c = pi(y_c|x) - ref(y_c|x),  r = pi(y_r|x) - ref(y_r|x):

    sigmoid  -(1 - e) log s(b (c - r)) - e log s(-b (c - r))        DPO; e = label_smoothing (cDPO)
    hinge    relu(1 - b (c - r))                                    SLiC
    ipo      (c / |y_c| - r / |y_r| - 1 / (2 b))^2                  IPO, per-token (as TRL)
    simpo    -log s(b (avg pi(y_c) - avg pi(y_r)) - gamma)          reference-free, length-normalised
    orpo     NLL(x + y_c) - lambda log s(log odds(y_c) - log odds(y_r)), odds(y) = p / (1 - p) of the
             per-token mean log-prob; lambda is TRL's ORPO `beta`; the NLL is the token mean over
             the chosen rows' prompt and completion (as TRL's ORPO)
    kto      desirable: 1 - s(b (c - z)), undesirable: 1 - s(b (z - r)), weighted; z = max(0, mean
             of the policy / reference log-ratio on mismatched (prompt, completion) pairs), no grad

Rewards are b * log-ratio for DPO and KTO, b * mean log-prob for the reference-free SimPO and ORPO
(TRL's CPO / ORPO trainers), so `rewards/accuracies` is the fraction of pairs whose chosen reward
beats the rejected one in every case. Everything is computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
REFERENCE_FREE = ("simpo",)


@dataclass
class Scored:
    """Per-example losses (grad) and, detached, the rewards and log-probs the metrics report."""

    losses: torch.Tensor  # (n,)
    chosen_rewards: torch.Tensor  # (n_c,)
    rejected_rewards: torch.Tensor  # (n_r,)
    chosen_logps: torch.Tensor  # (n_c,), what TRL logs as logps/chosen
    rejected_logps: torch.Tensor  # (n_r,)
    extra: dict[str, torch.Tensor] | None = None  # objective-specific scalars (ORPO's nll_loss, KTO's kl)


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo_loss(loss_type: str, beta: float, policy: tuple[torch.Tensor, torch.Tensor],
             reference: tuple[torch.Tensor, torch.Tensor] | None, tokens: tuple[torch.Tensor, torch.Tensor],
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> Scored:
    """DPO-family loss of n pairs: `policy` / `reference` are (chosen, rejected) summed log-probs (n,),
    `tokens` their completion token counts (reference unused, may be None, for simpo)."""
    (pc, pr), (tc, tr) = policy, (tokens[0].clamp(min=1), tokens[1].clamp(min=1))
    if loss_type == "simpo":
        avg_c, avg_r = pc / tc, pr / tr
        losses = _smoothed_sigmoid(beta * (avg_c - avg_r) - simpo_gamma, label_smoothing)
        return Scored(losses, beta * avg_c.detach(), beta * avg_r.detach(), avg_c.detach(), avg_r.detach())
    c, r = pc - reference[0], pr - reference[1]
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * (c - r), label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (c - r))
    elif loss_type == "ipo":
        losses = (c / tc - r / tr - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; expected one of {', '.join(DPO_LOSSES)}")
    return Scored(losses, beta * c.detach(), beta * r.detach(), pc.detach(), pr.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(lam: float, policy: tuple[torch.Tensor, torch.Tensor], tokens: tuple[torch.Tensor, torch.Tensor],
              chosen_sequences: tuple[torch.Tensor, torch.Tensor]) -> Scored:
    """ORPO of n pairs: `policy` / `tokens` over the completions, `chosen_sequences` the (log-prob sum,
    token count) of each whole chosen row (prompt + completion; TRL's NLL covers both). Each pair's
    loss carries the batch's token-mean NLL, so the batch sum is n * NLL - lambda * sum(log s(log
    odds)) and its mean TRL's ORPO loss."""
    (pc, pr), (tc, tr) = policy, tokens
    avg_c, avg_r = pc / tc.clamp(min=1), pr / tr.clamp(min=1)
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen_sequences[0].sum() / chosen_sequences[1].sum().clamp(min=1)
    losses = nll - lam * ratio
    extra = {"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()}
    return Scored(losses, lam * avg_c.detach(), lam * avg_r.detach(), avg_c.detach(), avg_r.detach(), extra)


def kto_loss(beta: float, policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Scored:
    """KTO of n unpaired completions: summed log-probs (n,), `desirable` (n,) bools, `kl` the batch's
    KL estimate (a detached scalar, already clamped at 0)."""
    ratio = policy - reference
    good, bad = ratio[desirable], ratio[~desirable]
    losses = torch.cat([desirable_weight * (1 - torch.sigmoid(beta * (good - kl))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - bad)))])
    return Scored(losses, beta * good.detach(), beta * bad.detach(), policy[desirable].detach(),
                  policy[~desirable].detach(), {"kl": kl.detach()})
