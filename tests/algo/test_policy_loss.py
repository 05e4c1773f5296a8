import itertools
import math

import pytest
import torch

from erc_megatron.algo import PolicyLossConfig, aggregation_denominator, policy_loss
from erc_megatron.algo.policy_loss import METRIC_REDUCTIONS, finalize_metrics
from erc_megatron.model.config import ConfigError
from tests.algo.reference import make_batch, reference_loss, token_refs

SURROGATES = ("ppo_clip", "gppo", "cispo", "gspo")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
F64 = torch.float64


def run(cfg, d, **kw):
    """policy_loss with gradient w.r.t. log_prob, entropy (and the inputs that must get none)."""
    lp = d["logp"].clone().requires_grad_()
    ent = d["ent"].clone().requires_grad_()
    old_ent = d["old_ent"].clone().requires_grad_()
    old = d["old"].clone().requires_grad_()
    loss, metrics = policy_loss(lp, old, d["adv"], d["mask"], ent, old_ent, cfg, rollout_log_prob=d["rollout"], **kw)
    grads = torch.autograd.grad(loss, [lp, ent, old_ent, old], allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, (lp, ent, old_ent, old))]
    return loss, metrics, grads


def grid_configs(surrogate: str, agg: str):
    for erc, c, tis, coef in itertools.product((False, True), (0.0, 3.0), (0.0, 1.5), (0.0, 0.02)):
        yield PolicyLossConfig(surrogate=surrogate, agg=agg, erc=erc, clip_ratio_c=c, tis_cap=tis, entropy_coef=coef,
                               gppo_beta1=0.7, gppo_beta2=1.3, gspo_eps_low=0.05, gspo_eps_high=0.08)


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("agg", AGGS)
def test_values_and_gradients_match_reference(surrogate, agg):
    for seed in (0, 1):
        d = make_batch(seed)
        for cfg in grid_configs(surrogate, agg):
            loss, _, (g_lp, g_h, g_hold, g_old) = run(cfg, d)
            ref_loss, ref_glp, ref_gh = reference_loss(cfg, d["logp"], d["old"], d["adv"], d["mask"], d["ent"],
                                                       d["old_ent"], d["rollout"])
            where = f"seed={seed} {cfg}"
            assert loss.dtype == F64
            assert math.isclose(loss.item(), ref_loss, rel_tol=1e-12, abs_tol=1e-14), where
            torch.testing.assert_close(g_lp, ref_glp, rtol=1e-11, atol=1e-14, msg=where)
            torch.testing.assert_close(g_h, ref_gh, rtol=1e-11, atol=1e-14, msg=where)
            assert torch.count_nonzero(g_hold) == 0 and torch.count_nonzero(g_old) == 0, where


def test_grid_exercises_every_branch():
    # guards the reference test against vacuous inputs: each case it distinguishes must occur
    d = make_batch(0)
    cfg = PolicyLossConfig(erc=True, clip_ratio_c=3.0)
    refs = [r for row in token_refs(cfg, d["logp"], d["old"], d["adv"], d["mask"], d["ent"], d["old_ent"]) for r in row
            if r is not None]
    assert any(r.clipped and r.ratio < 0.8 for r in refs) and any(r.clipped and r.ratio > 1.28 for r in refs)
    assert any(not r.clipped and not 0.8 <= r.ratio <= 1.28 for r in refs)  # outside band, unclipped branch
    assert any(r.dual for r in refs)
    rho = (d["ent"] + 1e-8) / (d["old_ent"] + 1e-8)
    band = (rho > 0.8) & (rho < 1.2) & d["mask"]
    assert 0 < band.sum() < d["mask"].sum()


def test_float32_inputs_match_float64_reference():
    d = make_batch(3, dtype=torch.float32)
    d64 = {k: (v.double() if v.is_floating_point() else v) for k, v in d.items()}
    for surrogate in SURROGATES:
        cfg = PolicyLossConfig(surrogate=surrogate, erc=True, tis_cap=1.5, entropy_coef=0.01, gspo_eps_low=0.05,
                               gspo_eps_high=0.08)
        loss, _, (g_lp, g_h, _, _) = run(cfg, d)
        ref_loss, ref_glp, ref_gh = reference_loss(cfg, d64["logp"], d64["old"], d64["adv"], d64["mask"], d64["ent"],
                                                   d64["old_ent"], d64["rollout"])
        assert loss.dtype == torch.float32
        assert math.isclose(loss.item(), ref_loss, rel_tol=2e-6, abs_tol=1e-7), surrogate
        torch.testing.assert_close(g_lp.double(), ref_glp, rtol=2e-6, atol=1e-8)
        torch.testing.assert_close(g_h.double(), ref_gh, rtol=2e-6, atol=1e-8)


def test_erc_out_of_band_tokens_keep_value_and_get_exactly_zero_gradient():
    d = make_batch(4)
    for surrogate in SURROGATES:
        kw = dict(surrogate=surrogate, gspo_eps_low=0.05, gspo_eps_high=0.08)
        loss_on, _, (g_on, _, _, _) = run(PolicyLossConfig(erc=True, **kw), d)
        loss_off, _, (g_off, _, _, _) = run(PolicyLossConfig(erc=False, **kw), d)
        rho = (d["ent"] + 1e-8) / (d["old_ent"] + 1e-8)
        out_band = ((rho <= 0.8) | (rho >= 1.2)) & d["mask"]
        in_band = ~out_band & d["mask"]
        assert out_band.any() and in_band.any()
        assert loss_on.item() == loss_off.item(), surrogate  # values of gated tokens still count
        assert torch.all(g_on[out_band] == 0), surrogate
        assert torch.equal(g_on[in_band], g_off[in_band]), surrogate
        assert g_off[out_band].abs().sum() > 0, surrogate  # the gate removed something real


def _edge_entropies(target: float) -> tuple[float, float]:
    """(H, H_old) whose float64 ratio (H + 1e-8) / (H_old + 1e-8) is exactly `target`."""
    for k in range(1, 200):
        h_old = 0.25 * k
        h = target * (h_old + 1e-8) - 1e-8
        if (h + 1e-8) / (h_old + 1e-8) == target:
            return h, h_old
    raise AssertionError(f"no exact float64 pair found for {target}")


def test_erc_band_edges_are_exclusive():
    low, high = 0.8, 1.2
    (h_lo, ho_lo), (h_hi, ho_hi) = _edge_entropies(low), _edge_entropies(high)
    _, ho_in = _edge_entropies(1.0)
    ent = torch.tensor([[h_lo, h_hi, ho_in]], dtype=F64)
    old_ent = torch.tensor([[ho_lo, ho_hi, ho_in]], dtype=F64)
    lp = torch.tensor([[-1.0, -0.5, -0.7]], dtype=F64, requires_grad=True)
    old = lp.detach() + 0.01  # ratios inside the clip band: gradient would be nonzero
    adv = torch.ones(1, 3, dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    cfg = PolicyLossConfig(erc=True, erc_low=low, erc_high=high)
    loss, metrics = policy_loss(lp, old, adv, mask, ent, old_ent, cfg)
    (g,) = torch.autograd.grad(loss, lp)
    assert g[0, 0] == 0 and g[0, 1] == 0 and g[0, 2] != 0
    assert metrics["erc_low"].item() == 1 and metrics["erc_high"].item() == 1 and metrics["erc_in_band"].item() == 1


def test_gppo_clipped_branch_gradient_is_scaled_bound_times_advantage():
    eps_low, eps_high, b1, b2 = 0.2, 0.28, 0.6, 1.7
    # token 0: A < 0, r = e^-0.8 < 1 - eps_low (low branch); token 1: A > 0, r = e^0.7 > 1 + eps_high (high)
    lp = torch.tensor([[-1.0, -2.0, -1.5]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-0.2, -2.7, -1.45]], dtype=F64)
    adv = torch.tensor([[-0.9, 1.3, 0.5]], dtype=F64)
    mask = torch.ones(1, 3)
    kw = dict(eps_low=eps_low, eps_high=eps_high, clip_ratio_c=0.0, gppo_beta1=b1, gppo_beta2=b2)
    loss, _ = policy_loss(lp, old, adv, mask, config=PolicyLossConfig(surrogate="gppo", **kw))
    (g,) = torch.autograd.grad(loss, lp)
    n = 3.0
    assert math.isclose(g[0, 0].item(), (1 - eps_low) * b1 * 0.9 / n, rel_tol=1e-14)  # -A = +0.9
    assert math.isclose(g[0, 1].item(), (1 + eps_high) * b2 * -1.3 / n, rel_tol=1e-14)
    r2 = math.exp(-1.5 + 1.45)
    assert math.isclose(g[0, 2].item(), -0.5 * r2 / n, rel_tol=1e-12)  # in band: ordinary -A * r
    # forward value equals PPO clip-higher, whose clipped branches have zero gradient
    loss_ppo, _ = policy_loss(lp, old, adv, mask, config=PolicyLossConfig(surrogate="ppo_clip", **kw))
    (g_ppo,) = torch.autograd.grad(loss_ppo, lp)
    assert loss.item() == loss_ppo.item()
    assert g_ppo[0, 0] == 0 and g_ppo[0, 1] == 0


def test_gspo_matches_sequence_level_objective():
    # with seq-mean-token-mean the token-level form must give the gradient of the sequence objective
    d = make_batch(5)
    d["adv"][3] = 0.6  # the sequence objective needs one advantage per sequence
    cfg = PolicyLossConfig(surrogate="gspo", agg="seq-mean-token-mean", clip_ratio_c=0.0, gspo_eps_low=0.05,
                           gspo_eps_high=0.08)
    lp = d["logp"].clone().requires_grad_()
    loss, _ = policy_loss(lp, d["old"], d["adv"], d["mask"], config=cfg)
    (g,) = torch.autograd.grad(loss, lp)
    lp2 = d["logp"].clone().requires_grad_()
    total, n_seq = 0.0, 0
    for i in range(lp2.shape[0]):
        m = d["mask"][i]
        if not m.any():
            continue
        s = torch.exp((lp2[i][m] - d["old"][i][m]).mean())
        a = d["adv"][i][m][0]
        total = total + torch.maximum(-a * s, -a * torch.clamp(s, 0.95, 1.08))
        n_seq += 1
    ref = total / n_seq
    (g_ref,) = torch.autograd.grad(ref, lp2)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-15)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("surrogate", SURROGATES)
def test_split_across_microbatches_and_ranks_is_invariant(surrogate):
    d = make_batch(6, B=8, T=6)
    d["mask"][5] = False
    for agg in AGGS:
        cfg = PolicyLossConfig(surrogate=surrogate, agg=agg, erc=True, tis_cap=1.5, entropy_coef=0.01,
                               gspo_eps_low=0.05, gspo_eps_high=0.08)
        whole, _, (g_whole, gh_whole, _, _) = run(cfg, d)
        # 2 "ranks" x 2 micro-batches of uneven sizes
        parts = [slice(0, 1), slice(1, 4), slice(4, 6), slice(6, 8)]
        n_global = sum(aggregation_denominator(d["mask"][p], agg) for p in parts)
        total = 0.0
        g_lp = torch.zeros_like(g_whole)
        g_h = torch.zeros_like(gh_whole)
        for p in parts:
            sub = {k: v[p] for k, v in d.items()}
            loss, _, (g, gh, _, _) = run(cfg, sub, global_denominator=n_global)
            total += loss.item()
            g_lp[p], g_h[p] = g, gh
        assert math.isclose(total, whole.item(), rel_tol=1e-12, abs_tol=1e-15), agg
        torch.testing.assert_close(g_lp, g_whole, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(g_h, gh_whole, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("surrogate", ("ppo_clip", "gppo", "cispo"))
def test_split_inside_sequences_like_context_parallel_is_invariant(surrogate):
    d = make_batch(7)
    for agg in AGGS:
        cfg = PolicyLossConfig(surrogate=surrogate, agg=agg, erc=True)
        whole, _, (g_whole, _, _, _) = run(cfg, d)
        n_global = aggregation_denominator(d["mask"], agg)  # from the unsplit masks
        seq_counts = d["mask"].sum(-1).double()
        total, g_lp = 0.0, torch.zeros_like(g_whole)
        for cols in (slice(0, 2), slice(2, 5), slice(5, 7)):
            sub = {k: v[:, cols] for k, v in d.items()}
            loss, _, (g, _, _, _) = run(cfg, sub, global_denominator=n_global, seq_token_counts=seq_counts)
            total += loss.item()
            g_lp[:, cols] = g
        assert math.isclose(total, whole.item(), rel_tol=1e-12, abs_tol=1e-15), agg
        torch.testing.assert_close(g_lp, g_whole, rtol=1e-12, atol=1e-15)


def test_aggregation_denominator_counts_tokens_or_nonempty_sequences():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 0]], dtype=torch.float32)
    assert aggregation_denominator(mask, "token-mean").item() == 3
    assert aggregation_denominator(mask, "seq-mean-token-mean").item() == 2
    assert aggregation_denominator(mask.bool(), "seq-mean-token-sum").item() == 2
    assert aggregation_denominator(mask, "token-mean").dtype == F64
    with pytest.raises(ValueError, match="token-mean"):
        aggregation_denominator(mask, "mean")


def test_metrics_match_reference_counts():
    d = make_batch(8)
    cfg = PolicyLossConfig(erc=True, tis_cap=1.2, clip_ratio_c=3.0)
    loss, metrics, _ = run(cfg, d)
    assert set(metrics) == set(METRIC_REDUCTIONS)
    assert all(v.dtype == F64 and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    refs = [r for row in token_refs(cfg, d["logp"], d["old"], d["adv"], d["mask"], d["ent"], d["old_ent"],
                                    d["rollout"]) for r in row if r is not None]
    m = d["mask"]
    rho = ((d["ent"] + 1e-8) / (d["old_ent"] + 1e-8))[m]
    tis = torch.clamp(torch.exp(d["old"] - d["rollout"]), max=1.2)[m]
    expect = {
        "tokens": len(refs), "seqs": 4, "loss": loss.item(), "pg_loss_sum": sum(r.value for r in refs),
        "ppo_clipped": sum(r.clipped for r in refs), "dual_clipped": sum(r.dual for r in refs),
        "kl_sum": (d["old"] - d["logp"])[m].sum().item(), "ratio_sum": sum(r.ratio for r in refs),
        "ratio_max": max(r.ratio for r in refs), "ratio_min": min(r.ratio for r in refs),
        "tis_weight_sum": tis.sum().item(), "tis_truncated": (torch.exp(d["old"] - d["rollout"])[m] > 1.2).sum().item(),
        "entropy_tokens": len(refs), "entropy_sum": d["ent"][m].sum().item(), "erc_tokens": len(refs),
        "old_entropy_sum": d["old_ent"][m].sum().item(), "erc_in_band": ((rho > 0.8) & (rho < 1.2)).sum().item(),
        "erc_low": (rho <= 0.8).sum().item(), "erc_high": (rho >= 1.2).sum().item(), "rho_sum": rho.sum().item(),
        "rho_min": rho.min().item(), "rho_max": rho.max().item(),
    }
    assert expect["dual_clipped"] > 0 and expect["tis_truncated"] > 0
    for k, v in expect.items():
        assert math.isclose(metrics[k].item(), v, rel_tol=1e-12, abs_tol=1e-12), k
    fin = finalize_metrics({k: v.item() for k, v in metrics.items()})
    assert math.isclose(fin["erc/in_band_frac"] + fin["erc/low_frac"] + fin["erc/high_frac"], 1.0, rel_tol=1e-12)
    assert math.isclose(fin["pg/approx_kl"], expect["kl_sum"] / len(refs), rel_tol=1e-12)


def test_empty_mask_gives_zero_loss_with_graph_and_identity_extrema():
    d = make_batch(9)
    d["mask"] = torch.zeros_like(d["mask"])
    d["logp"][0, 0] = float("nan")  # garbage under the mask must not leak
    for surrogate in SURROGATES:
        for agg in AGGS:
            for n in (None, 0.0):
                cfg = PolicyLossConfig(surrogate=surrogate, agg=agg, erc=True, tis_cap=2.0, entropy_coef=0.1)
                loss, metrics, (g, gh, _, _) = run(cfg, d, global_denominator=n)
                assert loss.item() == 0.0 and loss.requires_grad
                assert torch.all(g == 0) and torch.all(gh == 0)
                assert metrics["tokens"].item() == 0 and metrics["rho_min"].item() == math.inf
                assert metrics["rho_max"].item() == -math.inf and metrics["ratio_max"].item() == -math.inf
                fin = finalize_metrics({k: v.item() for k, v in metrics.items()})
                assert math.isnan(fin["erc/in_band_frac"]) and math.isnan(fin["erc/rho_min"])


def test_masked_garbage_and_extreme_ratios_stay_finite():
    d = make_batch(10)
    d["logp"][~d["mask"]] = float("-inf")
    d["old"][1, 1] = d["logp"][1, 1] + 80.0  # log-ratio far past the +-20 clamp
    d["old"][0, 0] = d["logp"][0, 0] - 80.0
    d["mask"][1, 1] = d["mask"][0, 0] = True
    for surrogate in SURROGATES:
        cfg = PolicyLossConfig(surrogate=surrogate, erc=True, tis_cap=2.0, gspo_eps_low=0.05, gspo_eps_high=0.08)
        loss, metrics, (g, _, _, _) = run(cfg, d)
        assert math.isfinite(loss.item()) and torch.isfinite(g).all(), surrogate
        assert math.isclose(metrics["ratio_max"].item(), math.exp(20.0), rel_tol=1e-12)
        assert math.isclose(metrics["ratio_min"].item(), math.exp(-20.0), rel_tol=1e-12)


def test_token_mean_accepts_flat_inputs():
    d = make_batch(11)
    m = d["mask"]
    flat = {k: v[m] for k, v in d.items()}
    cfg = PolicyLossConfig(erc=True)
    whole, _, (g_whole, _, _, _) = run(cfg, d)
    loss, _, (g, _, _, _) = run(cfg, flat)
    assert math.isclose(loss.item(), whole.item(), rel_tol=1e-12)
    torch.testing.assert_close(g, g_whole[m], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(surrogate="ppo"), ["surrogate", "ppo_clip", "gppo", "cispo", "gspo"]),
        (dict(agg="mean"), ["agg", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]),
        (dict(erc_low=1.0), ["erc_low", "0 < erc_low < 1"]),
        (dict(erc_low=1.3, erc_high=1.5), ["erc_low", "(0, 1)"]),
        (dict(erc_low=0.0), ["erc_low", "(0, 1)"]),
        (dict(erc_low=-0.1), ["erc_low"]),
        (dict(erc_high=1.0), ["erc_high", "> 1"]),
        (dict(erc_high=0.9), ["erc_high", "> 1"]),
        (dict(clip_ratio_c=1.0), ["clip_ratio_c", "> 1", "0 to disable"]),
        (dict(eps_low=1.0), ["eps_low", "[0, 1)"]),
        (dict(eps_high=-0.1), ["eps_high", ">= 0"]),
        (dict(gppo_beta1=-1.0), ["gppo_beta1", ">= 0"]),
        (dict(tis_cap=-1.0), ["tis_cap", ">= 0"]),
        (dict(entropy_coef=float("nan")), ["entropy_coef"]),
        (dict(gspo_eps_low=1.5), ["gspo_eps_low", "[0, 1)"]),
    ],
)
def test_config_validation_names_field_and_allowed_values(kwargs, words):
    with pytest.raises(ConfigError) as err:
        PolicyLossConfig(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_input_errors_are_clear():
    d = make_batch(12)
    lp, old, adv, mask = d["logp"], d["old"], d["adv"], d["mask"]
    with pytest.raises(ValueError, match="erc=True needs both entropy and old_entropy"):
        policy_loss(lp, old, adv, mask, d["ent"], None, PolicyLossConfig(erc=True))
    with pytest.raises(ValueError, match="tis_cap=2.0 needs rollout_log_prob"):
        policy_loss(lp, old, adv, mask, config=PolicyLossConfig(tis_cap=2.0))
    with pytest.raises(ValueError, match="entropy_coef=0.1 needs entropy"):
        policy_loss(lp, old, adv, mask, config=PolicyLossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(lp, old, adv[:, :1], mask)
    with pytest.raises(ValueError, match="need \\[batch, tokens\\] inputs"):
        policy_loss(lp[mask], old[mask], adv[mask], mask[mask], config=PolicyLossConfig(agg="seq-mean-token-sum"))
    with pytest.raises(ValueError, match="seq_token_counts has shape"):
        policy_loss(lp, old, adv, mask, seq_token_counts=torch.ones(2))
    with pytest.raises(ValueError, match="gspo.*not supported"):
        policy_loss(lp, old, adv, mask, config=PolicyLossConfig(surrogate="gspo"), seq_token_counts=mask.sum(-1))


def test_default_config_matches_dapo():
    cfg = PolicyLossConfig()
    assert (cfg.surrogate, cfg.eps_low, cfg.eps_high, cfg.clip_ratio_c, cfg.agg) == ("ppo_clip", 0.2, 0.28, 3.0,
                                                                                     "token-mean")
    assert (cfg.erc, cfg.erc_low, cfg.erc_high, cfg.tis_cap, cfg.entropy_coef) == (False, 0.8, 1.2, 0.0, 0.0)
