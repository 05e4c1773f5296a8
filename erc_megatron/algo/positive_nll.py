"""Positive-sample NLL (Klear-Reasoner): -logp averaged over the tokens of top-reward responses.

Added to the policy loss with a coefficient (0.1 in the ERC recipes) by the caller; never gated by
ERC. Token-mean over a GLOBAL denominator, like the policy loss: sum
`positive_nll_denominator` over every micro-batch and data-parallel rank once per mini-batch and
pass the total, so that the result does not depend on how the mini-batch is split.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

# How each metric returned by `positive_nll_loss` combines across micro-batches and ranks.
METRIC_REDUCTIONS: dict[str, str] = {
    "pos_nll_tokens": "sum",  # response tokens of positive (top-reward) responses
    "pos_nll_seqs": "sum",  # positive responses with at least one token
    "pos_nll_sum": "sum",  # sum of -logp over those tokens
    "pos_nll_loss": "sum",  # this call's contribution to the mini-batch term
}


def finalize_metrics(totals: Mapping[str, float]) -> dict[str, float]:
    """Global metrics from the reduced METRIC_REDUCTIONS totals."""
    tokens = totals["pos_nll_tokens"]
    return {
        "pos_nll/tokens": tokens,
        "pos_nll/seqs": totals["pos_nll_seqs"],
        "pos_nll/loss": totals["pos_nll_loss"],
        "pos_nll/token_mean": totals["pos_nll_sum"] / tokens if tokens > 0 else math.nan,
    }


def positive_token_mask(response_mask: torch.Tensor, rewards_per_seq: torch.Tensor,
                        max_reward: float | None = None) -> torch.Tensor:
    """Bool [B, T]: response tokens of sequences whose reward reaches `max_reward`.

    max_reward None takes the maximum of `rewards_per_seq` itself; pass the mini-batch's maximum
    (or the reward function's known best, e.g. 1.0) to keep the selection independent of how the
    mini-batch is split into micro-batches.
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [batch, tokens], got shape {tuple(response_mask.shape)}")
    if tuple(rewards_per_seq.shape) != tuple(response_mask.shape[:1]):
        raise ValueError(f"rewards_per_seq has shape {tuple(rewards_per_seq.shape)}, expected "
                         f"{tuple(response_mask.shape[:1])} (one reward per row of response_mask)")
    rewards = rewards_per_seq.detach()
    if max_reward is None:
        if rewards.numel() == 0:
            return response_mask > 0
        best = rewards.max()
    else:
        best = torch.as_tensor(max_reward, dtype=rewards.dtype, device=rewards.device)
    # >= rather than ==: equal to "== max" when best is the batch maximum, and robust to an
    # explicit best that a penalised reward can only reach from below
    positive = rewards >= best
    return (response_mask > 0) & positive.unsqueeze(-1)


def positive_nll_denominator(response_mask: torch.Tensor, rewards_per_seq: torch.Tensor,
                             max_reward: float | None = None) -> torch.Tensor:
    """This micro-batch's share of the global denominator: positive-response tokens (float64, 0-dim)."""
    return positive_token_mask(response_mask, rewards_per_seq, max_reward).sum(dtype=torch.float64)


def positive_nll_loss(
    log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    rewards_per_seq: torch.Tensor,
    max_reward: float | None = None,
    global_denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum over positive-response tokens of -logp, divided by the global count of such tokens.

    log_prob, response_mask: [B, T]; rewards_per_seq: [B]. global_denominator: the mini-batch
    total of `positive_nll_denominator`; None uses this call's own count. No positive tokens gives
    a loss of 0 that still backpropagates (zero gradient). Returns (loss, local metrics keyed as
    METRIC_REDUCTIONS).
    """
    if tuple(log_prob.shape) != tuple(response_mask.shape):
        raise ValueError(f"response_mask has shape {tuple(response_mask.shape)}, expected {tuple(log_prob.shape)} "
                         "(the shape of log_prob)")
    pos = positive_token_mask(response_mask, rewards_per_seq, max_reward)
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    nll = torch.where(pos, -log_prob.to(dtype), 0.0)
    count = pos.sum() if global_denominator is None else global_denominator
    # a count below 1 only happens with no positive tokens (numerator 0): 0/1, not NaN
    loss = nll.sum() / torch.as_tensor(count, dtype=dtype, device=nll.device).clamp(min=1.0)
    with torch.no_grad():
        metrics = {
            "pos_nll_tokens": pos.sum(dtype=torch.float64),
            "pos_nll_seqs": pos.any(-1).sum(dtype=torch.float64),
            "pos_nll_sum": nll.detach().to(torch.float64).sum(),
            "pos_nll_loss": loss.detach().to(torch.float64),
        }
    return loss, metrics
