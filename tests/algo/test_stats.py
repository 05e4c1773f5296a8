import math

import pytest
import torch
import torch.distributed as dist

from erc_megatron.algo import (
    PolicyLossConfig,
    StepStats,
    aggregation_denominator,
    policy_loss,
    positive_nll_denominator,
    positive_nll_loss,
    reduce_step_metrics,
)
from erc_megatron.comm import record_collectives
from tests.algo.reference import make_batch, reference_loss, token_refs
from tests.distributed import run_distributed

CFG = PolicyLossConfig(surrogate="gppo", eps_low=0.2, eps_high=0.2, clip_ratio_c=3.0, erc=True, erc_low=0.9,
                       erc_high=1.1, tis_cap=1.5)
SEED = 21


def global_data():
    """The whole mini-batch: 9 sequences (row 4 is padding) with rewards, lengths and positive-NLL rewards."""
    d = make_batch(SEED, B=9, T=6)
    d["rewards"] = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    return d


def rank_parts(rank: int, d: dict) -> list[dict]:
    """Micro-batches of each rank; rank 2 has two micro-batches without any response token."""
    rows = {0: [slice(0, 2), slice(2, 5)], 1: [slice(5, 7), slice(7, 9)], 2: [slice(0, 2), slice(2, 4)]}[rank]
    parts = []
    for p in rows:
        sub = {k: v[p].clone() for k, v in d.items()}
        if rank == 2:
            sub["mask"] = torch.zeros_like(sub["mask"])
        parts.append(sub)
    return parts


def local_step(rank: int, world_size: int) -> tuple[StepStats, float, torch.Tensor | None]:
    d = global_data()
    all_parts = [p for r in range(world_size) for p in rank_parts(r, d)]
    # every rank holds the whole mini-batch's masks: the global denominators cost no collective
    n_pg = sum(aggregation_denominator(p["mask"], CFG.agg) for p in all_parts)
    n_nll = sum(positive_nll_denominator(p["mask"], p["rewards"], 1.0) for p in all_parts)
    stats = StepStats()
    loss_sum = 0.0
    grads = []
    for p in rank_parts(rank, d):
        lp = p["logp"].clone().requires_grad_()
        loss, metrics = policy_loss(lp, p["old"], p["adv"], p["mask"], p["ent"], p["old_ent"], CFG,
                                    rollout_log_prob=p["rollout"], global_denominator=n_pg)
        nll, nll_metrics = positive_nll_loss(lp, p["mask"], p["rewards"], max_reward=1.0, global_denominator=n_nll)
        (loss + 0.1 * nll).backward()
        grads.append(lp.grad)
        loss_sum += loss.item()
        stats.add(metrics)
        stats.add(nll_metrics)
        has = p["mask"].any(-1)
        stats.add_scalar("reward/mean", p["rewards"][has], "mean")
        stats.add_scalar("response_length/max", p["mask"].sum(-1)[has], "max")
        stats.add_scalar("response_length/min", p["mask"].sum(-1)[has], "min")
        stats.add_scalar("samples", has.sum(), "sum")
    return stats, loss_sum, torch.cat(grads)


def _worker(rank: int, world_size: int):
    stats, loss_sum, grad = local_step(rank, world_size)
    with record_collectives() as rec:
        reduced = reduce_step_metrics(stats, dist.group.WORLD)
    ops = [e.op for e in rec.events]
    # a rank that names its extras differently (same count) must fail on EVERY rank, not hang or mix values
    bad = StepStats()
    bad.add_scalar("x" if rank != 1 else "y", 1.0, "sum")
    try:
        reduce_step_metrics(bad, dist.group.WORLD)
        mismatch_raised = False
    except RuntimeError as e:
        mismatch_raised = "different metric names" in str(e)
    return reduced, ops, loss_sum, grad, mismatch_raised


def reference_metrics() -> dict[str, float]:
    """Step metrics computed on the concatenated data in one process, float64, by plain loops."""
    d = global_data()
    m = d["mask"]
    refs = [r for row in token_refs(CFG, d["logp"], d["old"], d["adv"], m, d["ent"], d["old_ent"], d["rollout"])
            for r in row if r is not None]
    n = len(refs)
    rho = ((d["ent"] + 1e-8) / (d["old_ent"] + 1e-8))[m].tolist()
    ratio = [r.ratio for r in refs]
    raw_is = torch.exp(d["old"] - d["rollout"])[m].tolist()
    loss, _, _ = reference_loss(CFG, d["logp"], d["old"], d["adv"], m, d["ent"], d["old_ent"], d["rollout"])
    pos_rows = [i for i in range(9) if d["rewards"][i] == 1.0]
    pos_logp = [-d["logp"][i, t].item() for i in pos_rows for t in range(6) if m[i, t]]
    has = m.any(-1)
    lengths = m.sum(-1)[has].tolist()
    return {
        "pg/tokens": n,
        "pg/seqs": int(has.sum()),
        "pg/loss": loss,
        "pg/loss_token_mean": sum(r.value for r in refs) / n,
        "pg/clip_frac": sum(r.clipped for r in refs) / n,
        "pg/dual_clip_frac": sum(r.dual for r in refs) / n,
        "pg/approx_kl": sum((d["old"] - d["logp"])[m].tolist()) / n,
        "pg/ratio_mean": sum(ratio) / n,
        "pg/ratio_max": max(ratio),
        "pg/ratio_min": min(ratio),
        "tis/weight_mean": sum(min(x, 1.5) for x in raw_is) / n,
        "tis/truncated_frac": sum(x > 1.5 for x in raw_is) / n,
        "entropy/mean": sum(d["ent"][m].tolist()) / n,
        "entropy/old_mean": sum(d["old_ent"][m].tolist()) / n,
        "erc/in_band_frac": sum(0.9 < x < 1.1 for x in rho) / n,
        "erc/low_frac": sum(x <= 0.9 for x in rho) / n,
        "erc/high_frac": sum(x >= 1.1 for x in rho) / n,
        "erc/rho_mean": sum(rho) / n,
        "erc/rho_min": min(rho),
        "erc/rho_max": max(rho),
        "pos_nll/tokens": len(pos_logp),
        "pos_nll/seqs": len(pos_rows),
        "pos_nll/loss": sum(pos_logp) / len(pos_logp),
        "pos_nll/token_mean": sum(pos_logp) / len(pos_logp),
        "reward/mean": d["rewards"][has].mean().item(),
        "response_length/max": max(lengths),
        "response_length/min": min(lengths),
        "samples": int(has.sum()),
    }


def _assert_matches(got: dict, want: dict) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=1e-12, abs_tol=1e-14), (k, got[k], v)


@pytest.mark.e2e
def test_reduced_metrics_equal_concatenated_reference_on_gloo_ranks():
    results = run_distributed(_worker, world_size=3)
    want = reference_metrics()
    # the inputs must exercise what the metrics count
    assert 0 < want["pg/clip_frac"] and 0 < want["pg/dual_clip_frac"] and 0 < want["tis/truncated_frac"]
    assert 0 < want["erc/low_frac"] and 0 < want["erc/high_frac"] and 0 < want["erc/in_band_frac"] < 1
    for reduced, ops, _, _, mismatch_raised in results:
        _assert_matches(reduced, want)
        assert ops == ["all_reduce", "all_reduce"]
        assert mismatch_raised
    assert results[0][0] == results[1][0] == results[2][0]  # every rank logs the same numbers
    # rank split of the loss and its gradient: the per-rank pieces add up to the whole-batch result
    d = global_data()
    assert math.isclose(sum(r[2] for r in results), want["pg/loss"], rel_tol=1e-12)
    lp = d["logp"].clone().requires_grad_()
    loss, _ = policy_loss(lp, d["old"], d["adv"], d["mask"], d["ent"], d["old_ent"], CFG, rollout_log_prob=d["rollout"])
    nll, _ = positive_nll_loss(lp, d["mask"], d["rewards"], max_reward=1.0)
    (g_whole,) = torch.autograd.grad(loss + 0.1 * nll, lp)
    torch.testing.assert_close(torch.cat([results[0][3], results[1][3]]), g_whole, rtol=1e-12, atol=1e-15)
    assert torch.all(results[2][3] == 0)


def test_local_reduction_without_group_issues_no_collective():
    stats, _, _ = local_step(0, 1)  # world_size 1: rank 0's micro-batches are the whole mini-batch
    with record_collectives() as rec:
        out = reduce_step_metrics(stats, None)
    assert rec.count() == 0
    d = global_data()
    m = d["mask"][:5]
    assert out["pg/tokens"] == m.sum().item()
    assert math.isclose(out["entropy/mean"], d["ent"][:5][m].mean().item(), rel_tol=1e-12)


def test_extras_and_errors():
    s = StepStats()
    s.add_scalar("a", torch.tensor([1.0, 2.0]), "mean")
    s.add_scalar("a", 6.0, "mean")
    s.add_scalar("b", torch.tensor([]), "max")
    s.add_scalar("c", torch.tensor([3.0, -1.0]), "min")
    s.add_scalar("c", 0.5, "min")
    s.add_scalar("e", torch.tensor([]), "mean")
    out = reduce_step_metrics(s)
    assert out["a"] == 3.0 and math.isnan(out["b"]) and out["c"] == -1.0 and math.isnan(out["e"])
    with pytest.raises(ValueError, match="was added with reduce='mean', now 'sum'"):
        s.add_scalar("a", 1.0, "sum")
    with pytest.raises(ValueError, match="must be one of"):
        s.add_scalar("z", 1.0, "avg")
    with pytest.raises(KeyError, match="no declared reduction"):
        s.add({"unknown": torch.tensor(1.0)})
    s.add({"unknown": torch.tensor(1.0)}, reductions={"unknown": "sum"})
    clash = StepStats()
    _, metrics = policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
    clash.add(metrics)
    clash.add_scalar("pg/tokens", 1.0)
    with pytest.raises(ValueError, match="collides"):
        reduce_step_metrics(clash)
