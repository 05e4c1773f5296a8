"""A non-finite loss or entropy skips the optimizer step on every rank, leaving no trace.

On real gloo ranks, in one launch, at TP2 x PP2 (the loss lives on one rank of four; pipeline stage 0
learns the verdict from it) and at TP2 x PP1 (two data-parallel replicas; only replica 1's data is
bad, replica 0 must skip too), `update_policy` is called directly with:
- micro-batches carrying a NaN advantage (non-finite loss),
- micro-batches carrying a NaN old entropy with ERC on (non-finite entropy).
Each must report skipped == 1 on every rank, log its cause, and leave every parameter, the Adam
state and the LR schedule bit-identical. A normal step afterwards must update, and equal exactly the
step taken from the same state with no skipped steps in between (so no NaN gradient leaked through
megatron's gradient buffers).
"""
import logging
import math
import os

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.e2e  # multi-process launches

LAYOUTS = [(2, 2), (2, 1)]


def _model_cfg():
    from erc_megatron.model.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       vocab_size=40, make_vocab_size_divisible_by=8, add_qkv_bias=True,
                       untie_embeddings_and_output_weights=True, max_position_embeddings=64)


def _full_state(cfg, seed):
    from erc_megatron.weights.layout import full_param_names, full_param_shape

    g = torch.Generator().manual_seed(seed)
    return {name: (1.0 + 0.1 * torch.randn(full_param_shape(name, cfg, 1), generator=g))
            if name.endswith("layernorm.weight") else 0.08 * torch.randn(full_param_shape(name, cfg, 1), generator=g)
            for name in full_param_names(cfg)}


def _micro_batches(seed, vocab, n=4, b=2):
    """n micro-batches of b random prompt+response sequences with +-1 advantages."""
    from erc_megatron.train.batch import pack_sequences

    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(n):
        prompts = [torch.randint(1, vocab, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(b)]
        responses = [torch.randint(1, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
                     for _ in range(b)]
        mb = pack_sequences(prompts, responses, pad_id=0, seq_length=12)
        adv = torch.randint(0, 2, (b, 1), generator=g).float() * 2 - 1
        out.append(mb.with_(advantages=adv * mb.loss_mask, rollout_logp=torch.zeros_like(mb.loss_mask)))
    return out


def _poison(mbs, field):
    """A copy with NaN in `field` at the first response token of micro-batch 0 (where the loss reads it)."""
    mbs = list(mbs)
    value = getattr(mbs[0], field)
    if value is None:  # old_entropy exists on the last pipeline stage only
        return mbs
    value = value.clone()
    row, col = (mbs[0].loss_mask > 0).nonzero()[0].tolist()
    value[row, col] = math.nan
    mbs[0] = mbs[0].with_(**{field: value})
    return mbs


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _snapshot(learner):
    params = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    adam = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for p, s in learner.optimizer.optimizer.state.items()}
    return params, adam, learner.scheduler.num_steps, learner.optimizer.param_groups[0]["lr"]


def _untouched(before, after):
    """Names of whatever differs between two snapshots (empty: bit-identical)."""
    diffs = [n for n, t in before[0].items() if not torch.equal(t, after[0][n])]
    if before[1].keys() != after[1].keys():
        diffs.append("adam state keys")
    for pid, state in before[1].items():
        for k, v in state.items():
            w = after[1].get(pid, {}).get(k)
            if not (torch.equal(v, w) if torch.is_tensor(v) else v == w):
                diffs.append(f"adam {k}")
    if before[2:] != after[2:]:
        diffs.append(f"scheduler steps/lr {before[2:]} -> {after[2:]}")
    return diffs


def _worker(rank, world_size, seed, ckpt_dir):
    from megatron.core import parallel_state as ps

    from erc_megatron.algo import PolicyLossConfig
    from erc_megatron.dist import init_distributed
    from erc_megatron.model.config import ParallelConfig
    from erc_megatron.train.checkpoint import load_checkpoint, save_checkpoint
    from erc_megatron.train.learner import OptimConfig, build_learner
    from erc_megatron.train.step import LogitsConfig, old_policy_pass
    from erc_megatron.train.update import minibatch_denominators, update_policy
    from erc_megatron.weights.layout import shard_for_rank

    records = _Records()
    logging.getLogger("erc_megatron.train.update").addHandler(records)
    cfg = _model_cfg()
    full = _full_state(cfg, seed)
    everyone = _micro_batches(seed, cfg.vocab_size)
    loss_cfg = PolicyLossConfig(surrogate="ppo_clip", erc=True, erc_low=0.8, erc_high=1.2, agg="token-mean")
    logits_cfg = LogitsConfig(temperature=1.0)
    out = {}
    for tp, pp in LAYOUTS:
        init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=7), cfg)
        # warm-up: the LR changes every optimizer step, so a wrongly advanced schedule shows
        learner = build_learner(cfg, OptimConfig(lr=1e-2, lr_warmup_steps=10, weight_decay=0.01, clip_grad=1.0))
        local = shard_for_rank(full, cfg, ps.get_tensor_model_parallel_rank(), tp,
                               ps.get_pipeline_model_parallel_rank(), pp)
        missing, unexpected = learner.unwrapped.load_state_dict(local, strict=False)
        assert not unexpected and not [k for k in missing if not k.endswith("_extra_state")], (missing, unexpected)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_rank = len(everyone) // dp
        mine = old_policy_pass(learner.model, everyone[dp_rank * per_rank:(dp_rank + 1) * per_rank],
                               cfg.vocab_size, logits_cfg)
        den = minibatch_denominators(everyone, loss_cfg.agg, with_nll=False)
        # dp 2: only replica 1 sees the bad value; dp 1: the one replica does
        bad_here = dp_rank == dp - 1

        def update(mbs):
            return update_policy(learner, mbs, den, loss_cfg, logits_cfg)

        res = {"first": update(mine)}  # Adam now has state worth protecting
        snap_1 = _snapshot(learner)
        params_1 = snap_1[0]
        folder = save_checkpoint(os.path.join(ckpt_dir, f"tp{tp}pp{pp}"), 1, learner, {"weight_version": 1})
        res["reference"] = update(mine)  # the step straight after the first
        res["reference_params"] = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
        load_checkpoint(folder, learner)  # back to the state after the first step, into a used learner
        res["restore_diffs"] = _untouched(snap_1, _snapshot(learner))

        for case, field in (("nan_advantage", "advantages"), ("nan_old_entropy", "old_entropy")):
            before = _snapshot(learner)
            n_logged = len(records.messages)
            res[case] = update(_poison(mine, field) if bad_here else mine)
            res[case + "/diffs"] = _untouched(before, _snapshot(learner))
            res[case + "/log"] = records.messages[n_logged:]
        res["after"] = update(mine)
        res["after_params_equal_reference"] = all(
            torch.equal(p, res["reference_params"][n]) for n, p in learner.model.named_parameters())
        res["changed_vs_state_1"] = [n for n, p in learner.model.named_parameters() if not torch.equal(p, params_1[n])]
        res["n_params"] = len(params_1)
        res["all_finite"] = all(bool(torch.isfinite(p).all()) for p in learner.model.parameters())
        del res["reference_params"]
        out[(tp, pp)] = res
        del learner
        ps.destroy_model_parallel()
    return out


def test_nonfinite_loss_or_entropy_skips_the_step_everywhere_and_leaves_no_trace(tmp_path):
    seed = int(os.environ.get("ERC_TEST_SEED", "1234"))
    per_rank = run_distributed(_worker, 4, args=(seed, str(tmp_path)))
    for rank, results in enumerate(per_rank):
        for layout, res in results.items():
            where = f"seed {seed} rank {rank} layout {layout}"
            assert res["first"]["updated"] == 1.0 and res["first"]["skipped"] == 0.0, where
            # load_checkpoint into a learner that has stepped since: weights, Adam state and LR as saved
            assert not res["restore_diffs"], (where, res["restore_diffs"])
            for case, cause in (("nan_advantage", "loss"), ("nan_old_entropy", "entropy")):
                m = res[case]
                assert m["skipped"] == 1.0 and m["updated"] == 0.0, (where, case, m)
                assert not res[case + "/diffs"], (where, case, res[case + "/diffs"])
                assert any(f"skipped: non-finite {cause} on some rank" in msg for msg in res[case + "/log"]), \
                    (where, case, res[case + "/log"])
            # the poisoned value did reach the statistics (what the skip decision is made from)
            assert not math.isfinite(res["nan_advantage"]["pg/loss"]), (where, res["nan_advantage"])
            assert not math.isfinite(res["nan_old_entropy"]["entropy/old_mean"]), (where, res["nan_old_entropy"])
            after, ref = res["after"], res["reference"]
            assert after["updated"] == 1.0 and after["skipped"] == 0.0 and math.isfinite(after["grad_norm"]), where
            assert res["all_finite"], where
            # every statistic, the grad norm and the LR equal the step taken with nothing skipped before it
            for k in ref:
                assert (after[k] == ref[k]) or (math.isnan(after[k]) and math.isnan(ref[k])), (where, k, after[k], ref[k])
            assert after["lr"] > res["first"]["lr"], (where, after["lr"], res["first"]["lr"])
            assert res["after_params_equal_reference"], where
            assert len(res["changed_vs_state_1"]) == res["n_params"], (where, res["changed_vs_state_1"])
