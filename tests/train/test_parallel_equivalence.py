"""Same weights, same data, different layouts: TP2xPP2 (dp1), TP2xPP1 (dp2) and TP1xPP1 (dp4), with
and without the distributed optimizer, sequence parallelism and activation recomputation (full and
selective), with right-padded micro-batches and with packed token-budget ones
(trainer.max_tokens_per_micro_batch; those get the rollout from rank 0 through the compact per-rank
share, train/rollout_share.py), must give the same losses, ERC statistics, gradient norms and updated
weights over several ERC mini-batch updates.
"""
import math
import os
from typing import NamedTuple

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.e2e  # multi-process launches


class Layout(NamedTuple):
    tp: int
    pp: int
    fused: bool = False  # the fused output layer never materialises the logits
    distopt: bool = False  # megatron's DistributedOptimizer (dp > 1 only shards something)
    sp: bool = False  # sequence parallel
    recompute: tuple = (None, None, None)  # model.recompute_granularity / _method / _num_layers
    max_tokens: int | None = None  # a token budget packs sequences into rows (13 tokens: _rollout's longest)


REFERENCE = Layout(1, 1)
# one launch of 4 ranks runs them all; each option appears alone against a layout without it
LAYOUTS = [
    REFERENCE,
    Layout(2, 2),
    Layout(2, 1),
    Layout(2, 2, fused=True),
    Layout(1, 1, distopt=True),
    Layout(2, 1, distopt=True, sp=True),
    Layout(2, 2, fused=True, sp=True, recompute=("full", "uniform", 1)),
    Layout(2, 1, distopt=True, recompute=("selective", None, None)),
    Layout(1, 1, distopt=True, recompute=("full", "block", 3)),
    Layout(2, 2, max_tokens=16),
    Layout(2, 1, max_tokens=16),  # packed dp2 has placeholder rows (a rank with fewer bins)
]


def _model_cfg(recompute=(None, None, None)):
    from erc_megatron.model.config import ModelConfig

    granularity, method, num_layers = recompute
    return ModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       vocab_size=50, make_vocab_size_divisible_by=8, add_qkv_bias=True, qk_layernorm=True,
                       untie_embeddings_and_output_weights=False, max_position_embeddings=64,
                       recompute_granularity=granularity, recompute_method=method, recompute_num_layers=num_layers)


def _full_weights(learner, cfg):
    """The full model on every rank (layout-free, vocabulary padding cut off) via one all_gather_object."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from erc_megatron.weights.layout import TPSplit, gather_from_ranks, tp_split_of

    local = {k: v.detach().clone() for k, v in learner.unwrapped.state_dict().items()
             if not k.endswith("_extra_state") and "._erc_" not in k}  # the fused layer keeps its weight as _erc_weight
    key = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (ps.get_data_parallel_rank(), key, local))
    states = {k: st for dp_rank, k, st in everyone if dp_rank == 0}
    full = gather_from_ranks(states, cfg, ps.get_tensor_model_parallel_world_size(),
                             ps.get_pipeline_model_parallel_world_size())
    return {k: v[:cfg.vocab_size] if tp_split_of(k) is TPSplit.VOCAB else v for k, v in full.items()}


def _full_state(cfg, seed):
    from erc_megatron.weights.layout import full_param_names, full_param_shape

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in full_param_names(cfg):
        shape = full_param_shape(name, cfg, 1)
        if name.endswith("layernorm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = 0.08 * torch.randn(shape, generator=g)
    return state


def _rollout(seed, n_seqs=24, vocab=50):
    """Random prompts/responses with group advantages and rewards (what rank 0 would broadcast)."""
    from erc_megatron.rollout.collect import Sample

    g = torch.Generator().manual_seed(seed + 1)
    groups = []
    for gi in range(n_seqs // 4):
        group = []
        for _ in range(4):
            p = torch.randint(1, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
            r = torch.randint(1, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            reward = float(torch.randint(0, 2, (1,), generator=g)) * 2 - 1
            group.append(Sample(p, r, "", "", reward, [0.0] * len(r), "stop", gi))
        rewards = torch.tensor([s.reward for s in group])
        adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        for s, a in zip(group, adv.tolist()):
            s.advantage = a
        groups.append(group)
    return groups


def _packed_minibatches(groups, dp, max_tokens):
    """Rank 0 holds the rollout; every rank gets its data-parallel share as compact tensors."""
    from functools import partial

    from megatron.core import parallel_state as ps

    from erc_megatron.train.minibatch import build_minibatches, plan_minibatches
    from erc_megatron.train.rollout_share import RolloutShare

    plan = partial(plan_minibatches, prompts_per_minibatch=2, dp_size=dp, micro_batch_size=1, max_tokens=max_tokens)
    share, _ = RolloutShare(ps.get_data_parallel_rank(), dp, plan).share(lambda: (groups, {}))
    n = len(share.table)
    assert len(share.samples) < n or dp == 1  # each rank holds only its replica's share
    minibatches = build_minibatches(share.table, share.plans, share.samples, ps.get_data_parallel_rank(), 0, max_tokens)
    rows = [mb for m in minibatches for mb in m.mine]
    assert all(mb.packed and mb.tokens.shape[0] == 1 and mb.tokens.shape[1] <= max_tokens for mb in rows)
    # several sequences per row (the plan is the same on every rank)
    assert sum(1 for p in share.plans for mbs in p.ranks for mb in mbs if mb != [None]) < n
    return minibatches


def _worker(rank, world_size, seed):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from erc_megatron.comm import record_collectives

    from erc_megatron.algo import PolicyLossConfig
    from erc_megatron.dist import init_distributed
    from erc_megatron.model.config import ParallelConfig
    from erc_megatron.train.learner import OptimConfig, build_learner
    from erc_megatron.train.minibatch import split_minibatches
    from erc_megatron.train.step import LogitsConfig, old_policy_pass
    from erc_megatron.train.update import update_policy
    from erc_megatron.weights.layout import shard_for_rank

    full = _full_state(_model_cfg(), seed)
    groups = _rollout(seed)
    loss_cfg = PolicyLossConfig(surrogate="ppo_clip", erc=True, erc_low=0.995, erc_high=1.005, eps_low=0.2,
                                eps_high=0.28, clip_ratio_c=3.0, agg="token-mean")
    results = {}
    weights = {}
    for layout in LAYOUTS:
        tp, pp, fused = layout.tp, layout.pp, layout.fused
        cfg = _model_cfg(layout.recompute)
        logits_cfg = LogitsConfig(temperature=0.9, fused_output_layer=fused, chunk_size=7 if fused else None)
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=7,
                                  use_distributed_optimizer=layout.distopt, sequence_parallel=layout.sp)
        init_distributed(parallel, cfg)
        # adam_eps well above the gradients' rounding noise: with 1e-8 Adam turns last-bit
        # differences of near-zero gradient entries into +-lr updates (sign amplification), which
        # would compare the optimizer's chaos, not the layouts
        learner = build_learner(cfg, OptimConfig(lr=3e-3, weight_decay=0.0, clip_grad=1.0, adam_eps=1e-4), parallel)
        assert learner.distributed_optimizer == layout.distopt
        assert learner.transformer_config.sequence_parallel == layout.sp
        assert learner.transformer_config.recompute_granularity == layout.recompute[0]
        local = shard_for_rank(full, cfg, ps.get_tensor_model_parallel_rank(), tp,
                               ps.get_pipeline_model_parallel_rank(), pp)
        missing, unexpected = learner.unwrapped.load_state_dict(local, strict=False)
        assert not unexpected and not [k for k in missing if not k.endswith("_extra_state")], (missing, unexpected)
        dp = ps.get_data_parallel_world_size()
        if layout.max_tokens is None:
            minibatches = split_minibatches(groups, 2, ps.get_data_parallel_rank(), dp,
                                            micro_batch_size=4 // dp or 1, pad_id=0)
        else:
            minibatches = _packed_minibatches(groups if rank == 0 else None, dp, layout.max_tokens)
        flat = old_policy_pass(learner.model, [mb for m in minibatches for mb in m.mine], cfg.vocab_size, logits_cfg)
        steps = []
        i = 0
        for m in minibatches:
            mine = flat[i:i + len(m.mine)]
            i += len(m.mine)
            den = m.denominators(loss_cfg.agg, with_nll=True)
            with record_collectives() as rec:
                metrics = update_policy(learner, mine, den, loss_cfg, logits_cfg, nll_coef=0.1)
            # statistics: one SUM + one MAX over the world per optimizer step, never per micro-batch
            metrics["world_all_reduces"] = float(rec.count("all_reduce", group=dist.group.WORLD))
            # the log-prob/entropy op: one all-gather per micro-batch forward on the last stage
            # (sequence parallelism adds its own all-gathers on the TP group)
            if tp > 1 and ps.is_pipeline_last_stage() and not layout.sp:
                tp_group = ps.get_tensor_model_parallel_group()
                metrics["tp_all_gathers"] = float(sum(rec.count(op, group=tp_group) for op in
                                                      ("all_gather", "all_gather_into_tensor", "all_gather_single")))
                metrics["micro_batches"] = float(len(mine))
            # data parallel: one all-reduce of the gradient buffer, or with the distributed optimizer one
            # reduce-scatter of it and one all-gather of the updated weights, recorded at their real size
            dp_ranks = tuple(dist.get_process_group_ranks(ps.get_data_parallel_group()))
            on_dp = [e for e in rec.events if e.group is not None and e.group.ranks == dp_ranks]
            for kind in ("reduce_scatter", "all_gather", "all_reduce"):
                events = [e for e in on_dp if e.op.startswith(kind)]
                metrics[f"dp_{kind}_count"] = float(len(events))
                metrics[f"dp_{kind}_bytes"] = float(sum(e.nbytes for e in events))
            metrics["param_bytes"] = float(4 * sum(p.numel() for p in learner.unwrapped.parameters()))
            steps.append(metrics)
        if ps.is_pipeline_last_stage():
            assert getattr(learner.unwrapped.output_layer, "_erc_fused", False) == fused
        results[layout] = steps
        weights[layout] = _full_weights(learner, cfg)
        del learner
        ps.destroy_model_parallel()
    # the updated weights, compared here so only a verdict per layout travels back
    worst = {}
    for layout, w in weights.items():
        ref_w = weights[REFERENCE]
        assert set(w) == set(ref_w)
        worst[layout] = max(((w[k] - ref_w[k]).abs() - 2e-5 * ref_w[k].abs()).max().item() for k in w)
        moved = max((w[k] - full[k][:w[k].shape[0]]).abs().max().item() for k in w)
        assert moved > 1e-3, (layout, moved)  # the three updates did change the weights
    results["weights_excess"] = worst
    return results


def test_layouts_distopt_sp_recompute_fused_same_erc_training():
    seed = int(os.environ.get("ERC_TEST_SEED", "1234"))
    per_rank = run_distributed(_worker, 4, args=(seed,))
    ref = per_rank[0][REFERENCE]
    assert len(ref) == 3
    keys = ["pg/loss", "grad_norm", "erc/in_band_frac", "erc/rho_mean", "erc/rho_max", "entropy/mean",
            "entropy/old_mean", "pg/approx_kl", "pg/tokens", "pos_nll/loss" if "pos_nll/loss" in ref[0] else "pg/seqs"]
    # the ERC band actually clipped something after the first update, or the test proves little
    assert any(s["erc/in_band_frac"] < 1.0 for s in ref[1:]), ref
    assert all(s["updated"] == 1.0 for s in ref)
    for rank_results in per_rank:
        for layout, excess in rank_results["weights_excess"].items():
            # |w - w_ref| <= 2e-5 |w_ref| + 1e-6, the metrics' tolerance, for every weight
            assert excess <= 1e-6, f"seed {seed} layout {layout}: updated weights differ by {excess} beyond tolerance"
        for layout in LAYOUTS:
            for got in rank_results[layout]:
                assert got["world_all_reduces"] == 2.0, (layout, got["world_all_reduces"])
                if "tp_all_gathers" in got:
                    assert got["tp_all_gathers"] == got["micro_batches"], (layout, got)
        for layout in LAYOUTS:
            for got in rank_results[layout]:
                if layout.tp * layout.pp == 4:
                    continue
                # megatron pads every parameter's start in the buffer to 64 elements and the buffer to a
                # multiple of 128 x dp: under 1% here; the planner's 5% is the bound
                buffer_bytes = (got["param_bytes"], got["param_bytes"] * 1.05)
                if layout.distopt:
                    assert got["dp_reduce_scatter_count"] == got["dp_all_gather_count"] == 1, (layout, got)
                    assert buffer_bytes[0] <= got["dp_reduce_scatter_bytes"] <= buffer_bytes[1], (layout, got)
                    assert buffer_bytes[0] <= got["dp_all_gather_bytes"] <= buffer_bytes[1], (layout, got)
                    assert got["dp_all_reduce_bytes"] < 1024, (layout, got)  # statistics and norms only
                else:
                    assert got["dp_reduce_scatter_count"] == 0, (layout, got)
                    assert got["dp_all_reduce_bytes"] >= buffer_bytes[0], (layout, got)
        for layout in LAYOUTS:
            for step, (got, want) in enumerate(zip(rank_results[layout], ref)):
                for k in keys:
                    assert math.isclose(got[k], want[k], rel_tol=2e-5, abs_tol=1e-6), \
                        f"seed {seed} layout {layout} step {step} {k}: {got[k]} vs {want[k]}"
