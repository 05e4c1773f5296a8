import math

import pytest
import torch

from erc_megatron.algo import positive_nll_denominator, positive_nll_loss
from erc_megatron.algo.positive_nll import METRIC_REDUCTIONS, finalize_metrics

F64 = torch.float64


def make(seed: int, B: int = 6, T: int = 5):
    g = torch.Generator().manual_seed(seed)
    logp = -(torch.rand(B, T, generator=g, dtype=F64) * 3 + 0.01)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    rewards = torch.tensor([1.0, -1.0, 1.0, -0.5, -1.0, 0.7], dtype=F64)[:B]
    return logp, mask, rewards


def reference(logp, mask, rewards, best):
    """Plain loops: sum of -logp over tokens of responses with reward == best, / their count."""
    B, T = logp.shape
    total, n = 0.0, 0
    grad = torch.zeros(B, T, dtype=F64)
    for i in range(B):
        if rewards[i].item() == best:
            for t in range(T):
                if mask[i, t]:
                    total += -logp[i, t].item()
                    n += 1
    for i in range(B):
        if rewards[i].item() == best:
            for t in range(T):
                if mask[i, t]:
                    grad[i, t] = -1.0 / n
    return total / n, grad, n


def test_value_and_gradient_match_reference():
    logp, mask, rewards = make(0)
    lp = logp.clone().requires_grad_()
    loss, metrics = positive_nll_loss(lp, mask, rewards)
    (g,) = torch.autograd.grad(loss, lp)
    ref, ref_g, n = reference(logp, mask, rewards, best=1.0)
    assert math.isclose(loss.item(), ref, rel_tol=1e-13)
    torch.testing.assert_close(g, ref_g, rtol=1e-13, atol=1e-16)
    assert set(metrics) == set(METRIC_REDUCTIONS)
    assert metrics["pos_nll_tokens"].item() == n and metrics["pos_nll_seqs"].item() == 2
    fin = finalize_metrics({k: v.item() for k, v in metrics.items()})
    assert math.isclose(fin["pos_nll/token_mean"], ref, rel_tol=1e-13)


def test_explicit_max_reward_and_split_invariance():
    logp, mask, rewards = make(1)
    lp = logp.clone().requires_grad_()
    whole, _ = positive_nll_loss(lp, mask, rewards, max_reward=1.0)
    (g_whole,) = torch.autograd.grad(whole, lp)
    parts = [slice(0, 2), slice(2, 3), slice(3, 6)]  # the last part has no positive response
    n = sum(positive_nll_denominator(mask[p], rewards[p], 1.0) for p in parts)
    total, g = 0.0, torch.zeros_like(logp)
    for p in parts:
        lp_p = logp[p].clone().requires_grad_()
        loss, _ = positive_nll_loss(lp_p, mask[p], rewards[p], max_reward=1.0, global_denominator=n)
        total += loss.item()
        g[p] = torch.autograd.grad(loss, lp_p)[0]
    assert math.isclose(total, whole.item(), rel_tol=1e-13)
    torch.testing.assert_close(g, g_whole, rtol=1e-13, atol=1e-16)


def test_no_positive_tokens_gives_zero_with_graph():
    logp, mask, rewards = make(2)
    lp = logp.clone().requires_grad_()
    loss, metrics = positive_nll_loss(lp, mask, rewards, max_reward=2.0)
    assert loss.item() == 0.0 and loss.requires_grad
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.all(g == 0)
    assert math.isnan(finalize_metrics({k: v.item() for k, v in metrics.items()})["pos_nll/token_mean"])


def test_shape_errors():
    logp, mask, rewards = make(3)
    with pytest.raises(ValueError, match="rewards_per_seq has shape"):
        positive_nll_loss(logp, mask, rewards[:2])
    with pytest.raises(ValueError, match="response_mask has shape"):
        positive_nll_loss(logp, mask[:, :2], rewards)
