"""Resume on a different layout: save at TP2xPP2, resume at TP1xPP1 (dp4) and TP2xPP1 (dp2); the next
step's losses, gradient norms and ERC statistics equal those of the run that kept its layout, within
test_parallel_equivalence's tolerances, because weights AND Adam moments are resharded. Resuming at
the saved layout stays bit-exact. A control resumes with the moments dropped and must differ, so
the comparison can fail. The layout-free folders forced at the saved layout give the same next step,
bit for bit, as the per-rank files: the format itself loses nothing.

With the distributed optimizer (ZeRO-1, Adam state sliced over data parallel): the TP1xPP1 resume
above runs with it (saved without), and a second checkpoint saved with it at TP2xPP1 (dp2) resumes
bit-exact on its own layout and, within the same tolerances, without it and at TP1xPP1 with it (dp4).
"""
import math
import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.train.test_parallel_equivalence import _full_state, _rollout

pytestmark = pytest.mark.e2e  # multi-process launches

SAVED = (2, 2)
RESHARDED = [(1, 1), (2, 1)]
DISTOPT_SAVED = (2, 1)  # saved with the distributed optimizer (dp2)
KEYS = ["pg/loss", "grad_norm", "erc/in_band_frac", "erc/rho_mean", "entropy/mean", "entropy/old_mean",
        "pg/approx_kl", "pos_nll/loss"]


def _model_cfg():
    from erc_megatron.model.config import ModelConfig

    # HF-mappable (Qwen3: qk-norm, no qkv bias), tied embeddings split over two stages
    return ModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       vocab_size=50, make_vocab_size_divisible_by=8, add_qkv_bias=False, qk_layernorm=True,
                       untie_embeddings_and_output_weights=False, max_position_embeddings=64,
                       hf_architecture="Qwen3ForCausalLM")


def _step(learner, groups, cfg, micro_batch_size=None):
    """Two ERC mini-batch updates; `micro_batch_size` per rank (default 4 / dp: 4 sequences per micro-batch step)."""
    from megatron.core import parallel_state as ps

    from erc_megatron.algo import PolicyLossConfig
    from erc_megatron.train.minibatch import split_minibatches
    from erc_megatron.train.step import LogitsConfig, old_policy_pass
    from erc_megatron.train.update import update_policy

    loss_cfg = PolicyLossConfig(surrogate="ppo_clip", erc=True, erc_low=0.995, erc_high=1.005, clip_ratio_c=3.0)
    logits_cfg = LogitsConfig(temperature=0.9)
    dp = ps.get_data_parallel_world_size()
    minibatches = split_minibatches(groups, 2, ps.get_data_parallel_rank(), dp,
                                    micro_batch_size=micro_batch_size or 4 // dp or 1, pad_id=0)
    flat = old_policy_pass(learner.model, [mb for m in minibatches for mb in m.mine], cfg.vocab_size, logits_cfg)
    out, i = [], 0
    for m in minibatches:
        mine = flat[i:i + len(m.mine)]
        i += len(m.mine)
        den = m.denominators(loss_cfg.agg, with_nll=True)
        out.append(update_policy(learner, mine, den, loss_cfg, logits_cfg, nll_coef=0.1))
    return out


def _worker(rank, world_size, seed, run_dir):
    from megatron.core import parallel_state as ps

    from erc_megatron.dist import init_distributed
    from erc_megatron.model.config import ParallelConfig
    from erc_megatron.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from erc_megatron.train.learner import OptimConfig, build_learner
    from erc_megatron.weights.layout import shard_for_rank

    cfg = _model_cfg()
    optim = OptimConfig(lr=3e-3, weight_decay=0.0, clip_grad=1.0, adam_eps=1e-4)
    data_state = {"epoch": 1, "offset": 7, "seed": 3, "shuffle": True, "dataset_size": 20}

    def learner_at(tp, pp, distopt=None):
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=7,
                                  use_distributed_optimizer=distopt)
        init_distributed(parallel, cfg)
        learner = build_learner(cfg, optim, parallel)
        # default (null): the distributed optimizer exactly when data parallel > 1
        want = distopt if distopt is not None else ps.get_data_parallel_world_size() > 1
        assert learner.distributed_optimizer == want
        return learner

    def start(tp, pp, distopt, folder):
        learner = learner_at(tp, pp, distopt)
        local = shard_for_rank(_full_state(cfg, seed), cfg, ps.get_tensor_model_parallel_rank(), tp,
                               ps.get_pipeline_model_parallel_rank(), pp)
        learner.unwrapped.load_state_dict(local, strict=False)
        _step(learner, _rollout(seed), cfg)
        save_checkpoint(folder, 1, learner, {"weight_version": 1, "data": data_state})
        out = _step(learner, _rollout(seed + 1), cfg)
        del learner
        ps.destroy_model_parallel()
        return out

    def resume(folder, tp, pp, distopt=None, drop_moments=False, layout_free=False, saved=SAVED):
        learner = learner_at(tp, pp, distopt)
        state = load_checkpoint(latest_checkpoint(folder), learner, layout_free=layout_free)
        assert state["step"] == 1 and state["weight_version"] == 1 and state["data"] == data_state, state
        same = (tp, pp) == saved[:2] and learner.distributed_optimizer == saved[2]
        assert ("resharded_from" in state) == (not same or layout_free), state
        assert learner.scheduler.num_steps == 3, learner.scheduler.num_steps
        if drop_moments:
            from erc_megatron.patches.megatron_adam_state import _torch_optimizers

            for opt in _torch_optimizers(learner.optimizer):
                opt.state.clear()
        out = _step(learner, _rollout(seed + 1), cfg)
        del learner
        ps.destroy_model_parallel()
        return out

    results = {"uninterrupted": start(*SAVED, None, run_dir)}
    saved = (*SAVED, False)
    # (tp, pp, drop the Adam moments after loading, force the layout-free folders); TP1xPP1 (dp4) runs
    # with the distributed optimizer (the default there), TP2xPP1 (dp2) without it
    for tp, pp, drop_moments, layout_free in [(*RESHARDED[0], False, False), (*RESHARDED[1], False, False),
                                              (*RESHARDED[0], True, False), (*SAVED, False, False),
                                              (*SAVED, False, True)]:
        distopt = False if (tp, pp) == RESHARDED[1] else None
        results[(tp, pp, drop_moments, layout_free)] = resume(run_dir, tp, pp, distopt, drop_moments, layout_free,
                                                              saved)
    # saved with the distributed optimizer
    distopt_dir = os.path.join(run_dir, "distopt")
    results["distopt_uninterrupted"] = start(*DISTOPT_SAVED, True, distopt_dir)
    saved = (*DISTOPT_SAVED, True)
    results["distopt_same"] = resume(distopt_dir, *DISTOPT_SAVED, True, saved=saved)
    results["distopt_to_plain"] = resume(distopt_dir, *DISTOPT_SAVED, False, saved=saved)
    results["distopt_to_dp4"] = resume(distopt_dir, 1, 1, True, saved=saved)
    return results


def test_resume_on_another_layout_matches_the_run_that_kept_its_layout(tmp_path):
    seed = int(os.environ.get("ERC_TEST_SEED", "1234"))
    per_rank = run_distributed(_worker, 4, args=(seed, str(tmp_path)))
    ckpt = tmp_path / "checkpoints" / "step_000001"
    assert {p.name for p in ckpt.iterdir()} >= {"model", "adam_exp_avg", "adam_exp_avg_sq", "trainer.json"}
    for results in per_rank:
        ref = results["uninterrupted"]
        assert len(ref) == 3 and any(s["erc/in_band_frac"] < 1.0 for s in ref), ref
        # same layout: the per-rank files, and the layout-free folders, bit for bit
        assert results[(*SAVED, False, False)] == ref
        assert results[(*SAVED, False, True)] == ref
        for tp, pp in RESHARDED:
            for update, (got, want) in enumerate(zip(results[(tp, pp, False, False)], ref)):
                for k in KEYS:
                    assert math.isclose(got[k], want[k], rel_tol=2e-5, abs_tol=1e-6), \
                        f"seed {seed} TP{tp}xPP{pp} update {update} {k}: {got[k]} vs {want[k]}"
        # with the distributed optimizer: its own layout bit for bit, the others within tolerance
        ref_d = results["distopt_uninterrupted"]
        assert results["distopt_same"] == ref_d
        for variant in ("distopt_to_plain", "distopt_to_dp4"):
            for update, (got, want) in enumerate(zip(results[variant], ref_d)):
                for k in KEYS:
                    assert math.isclose(got[k], want[k], rel_tol=2e-5, abs_tol=1e-6), \
                        f"seed {seed} {variant} update {update} {k}: {got[k]} vs {want[k]}"
        # without the moments the first update still matches (same weights) but the next ones do not
        dropped = results[(*RESHARDED[0], True, False)]
        assert math.isclose(dropped[0]["pg/loss"], ref[0]["pg/loss"], rel_tol=2e-5, abs_tol=1e-6)
        assert any(not math.isclose(d["pg/loss"], r["pg/loss"], rel_tol=2e-5, abs_tol=1e-6)
                   for d, r in zip(dropped[1:], ref[1:])), (dropped, ref)
