"""Resume an expert-parallel MoE run on another layout (2 gloo ranks, one launch).

A tiny Qwen3-MoE (4 experts, top-2, aux loss on) is saved at EP2 (dp2: the distributed optimizer is
on; the experts' Adam state is whole on each EP rank, expert data parallel being 1) and resumed at
EP1 (dp2: the experts' Adam state is now sliced over two expert data-parallel ranks), TP2 x EP2 x
ETP1 and TP2 x EP1 x ETP2 (dp1, sequence parallel: the plain optimizer) and PP2 x EP1 (dp1), with
the same micro-batches everywhere (the aux loss is per micro-batch); a second checkpoint saved
at EP1 resumes at EP2. The next step's losses, gradient norms and ERC statistics equal those of the
run that kept its layout within test_parallel_equivalence's tolerances, because the expert weights
and their Adam moments are resharded through the layout-free folders. Resuming at the saved layout
stays bit-exact, from the per-rank files or the layout-free folders. Controls resume with all the
moments, or only the experts', dropped and must differ, so the comparison can fail. A checkpoint
whose layout does not record the expert sizes (older versions) reshards even on its own layout, and
without a layout-free copy is refused, naming the fields.
"""
import math
import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.train.test_parallel_equivalence import _full_state, _rollout
from tests.train.test_resharded_resume import KEYS, _step

pytestmark = pytest.mark.e2e  # multi-process launches


SAVED = (1, 1, 2, 1)  # EP2, dp2
# EP1 dp2; TP2 x EP2 x ETP1 dp1; TP2 x EP1 x ETP2 dp1 (both sequence parallel, which MoE needs under TP);
# PP2 x EP1 dp1
RESHARDED = [(1, 1, 1, 1), (2, 1, 2, 1), (2, 1, 1, 2), (1, 2, 1, 1)]
EP1_SAVED = (1, 1, 1, 1)
# the same micro-batches (token sets) at dp1 and dp2: the aux loss is per micro-batch, as in HF
MICRO_BATCH = 2


def _model_cfg():
    from erc_megatron.model.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       vocab_size=50, make_vocab_size_divisible_by=8, add_qkv_bias=False, qk_layernorm=True,
                       untie_embeddings_and_output_weights=False, max_position_embeddings=64,
                       hf_architecture="Qwen3MoeForCausalLM", num_moe_experts=4, moe_ffn_hidden_size=16,
                       moe_router_topk=2, moe_aux_loss_coeff=0.01)


def _worker(rank, world_size, seed, run_dir):
    from megatron.core import parallel_state as ps

    from erc_megatron.dist import init_distributed
    from erc_megatron.model.config import ParallelConfig
    from erc_megatron.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from erc_megatron.train.learner import OptimConfig, build_learner
    from erc_megatron.weights.layout import shard_for_rank
    from erc_megatron.weights.rank_params import rank_groups

    cfg = _model_cfg()
    optim = OptimConfig(lr=3e-3, weight_decay=0.0, clip_grad=1.0, adam_eps=1e-4)
    data_state = {"epoch": 1, "offset": 7, "seed": 3, "shuffle": True, "dataset_size": 20}

    def learner_at(tp, pp, ep, etp):
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  expert_model_parallel_size=ep, expert_tensor_parallel_size=etp, seed=7,
                                  sequence_parallel=tp > 1)
        init_distributed(parallel, cfg)
        learner = build_learner(cfg, optim, parallel)
        assert learner.distributed_optimizer == (ps.get_data_parallel_world_size() > 1)
        return learner

    def start(layout, folder):
        learner = learner_at(*layout)
        g = rank_groups()
        local = shard_for_rank(_full_state(cfg, seed), cfg, g.tp_rank, g.tp_size, g.pp_rank, g.pp_size,
                               ep_rank=g.ep_rank, ep_size=g.ep_size, etp_rank=g.etp_rank, etp_size=g.etp_size)
        missing, unexpected = learner.unwrapped.load_state_dict(local, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        _step(learner, _rollout(seed), cfg, MICRO_BATCH)
        save_checkpoint(folder, 1, learner, {"weight_version": 1, "data": data_state})
        out = _step(learner, _rollout(seed + 1), cfg, MICRO_BATCH)
        del learner
        ps.destroy_model_parallel()
        return out

    def drop_moments(learner, which):
        from erc_megatron.patches.megatron_adam_state import MOMENTS, _torch_optimizers, store_adam_moments

        if which == "all":
            for opt in _torch_optimizers(learner.optimizer):
                opt.state.clear()
        elif which == "experts":  # zeros, each rank its own slice: only the experts' moments are lost
            experts = [p for n, p in learner.unwrapped.named_parameters() if ".experts." in n]
            for name in MOMENTS:
                store_adam_moments(learner.optimizer, experts, name, {p: torch.zeros(p.shape) for p in experts})

    def resume(folder, layout, saved, drop=None, layout_free=False, checkpoint=None, refused=None):
        learner = learner_at(*layout)
        held = {n for n, _ in learner.unwrapped.named_parameters() if ".experts." in n and "layers.0." in n}
        assert len(held) == 2 * cfg.num_moe_experts // layout[2], held  # fc1 and fc2 of this EP rank's experts
        if refused is not None:
            with pytest.raises(FileNotFoundError, match="expert_model_parallel_size / expert_tensor_parallel_size"):
                load_checkpoint(refused, learner)
        state = load_checkpoint(checkpoint or latest_checkpoint(folder), learner, layout_free=layout_free)
        assert state["step"] == 1 and state["weight_version"] == 1 and state["data"] == data_state, state
        assert ("resharded_from" in state) == (layout != saved or layout_free), state
        drop_moments(learner, drop)
        out = _step(learner, _rollout(seed + 1), cfg, MICRO_BATCH)
        del learner
        ps.destroy_model_parallel()
        return out

    results = {"uninterrupted": start(SAVED, run_dir)}
    for layout, drop, layout_free in [(SAVED, None, False), (SAVED, None, True), *[(r, None, False) for r in RESHARDED],
                                      (RESHARDED[0], "all", False), (RESHARDED[0], "experts", False)]:
        results[(layout, drop, layout_free)] = resume(run_dir, layout, SAVED, drop, layout_free)
    with_copy, without = _legacy_checkpoints(run_dir)
    # saved=None: the layout the checkpoint was saved on is unknown, so it must reshard
    results["legacy"] = resume(None, SAVED, None, checkpoint=with_copy, refused=without)
    ep1_dir = os.path.join(run_dir, "ep1")
    results["ep1_uninterrupted"] = start(EP1_SAVED, ep1_dir)
    results["ep1_to_ep2"] = resume(ep1_dir, SAVED, EP1_SAVED)
    return results


def _legacy_checkpoints(run_dir):
    """Copies of the checkpoint as an older version wrote it (no expert sizes in trainer.json's layout),
    with and without its layout-free copy: the first reshards even on its own layout, the second is
    refused, naming the fields."""
    import json
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    src = Path(run_dir) / "checkpoints" / "step_000001"
    with_copy, without = Path(run_dir) / "legacy" / "with_copy", Path(run_dir) / "legacy" / "without"
    if dist.get_rank() == 0:
        for dst in (with_copy, without):
            shutil.copytree(src, dst)
            state = json.loads((dst / "trainer.json").read_text())
            state["layout"] = {k: v for k, v in state["layout"].items() if not k.startswith("expert_")}
            (dst / "trainer.json").write_text(json.dumps(state))
        shutil.rmtree(without / "model")
    dist.barrier()
    return with_copy, without


def _close(got, want, what):
    for update, (g, w) in enumerate(zip(got, want)):
        for k in KEYS:
            assert math.isclose(g[k], w[k], rel_tol=2e-5, abs_tol=1e-6), f"{what} update {update} {k}: {g[k]} vs {w[k]}"
    used = max(abs(g[k] - w[k]) / max(2e-5 * max(abs(g[k]), abs(w[k])), 1e-6) for g, w in zip(got, want) for k in KEYS)
    print(f"{what}: at most {used:.0%} of the tolerance")


def test_moe_resume_on_another_expert_layout_matches_the_run_that_kept_its_layout(tmp_path):
    seed = int(os.environ.get("ERC_TEST_SEED", "1234"))
    per_rank = run_distributed(_worker, 2, args=(seed, str(tmp_path)))
    ckpt = tmp_path / "checkpoints" / "step_000001"
    assert {p.name for p in ckpt.iterdir()} >= {"model", "adam_exp_avg", "adam_exp_avg_sq", "trainer.json"}
    for results in per_rank:
        ref = results["uninterrupted"]
        assert len(ref) == 3 and any(s["erc/in_band_frac"] < 1.0 for s in ref), ref
        # same layout: the per-rank files, the layout-free folders, and an older checkpoint's: bit for bit
        assert results[(SAVED, None, False)] == ref
        assert results[(SAVED, None, True)] == ref
        assert results["legacy"] == ref
        for layout in RESHARDED:
            _close(results[(layout, None, False)], ref, f"seed {seed} TPxPPxEPxETP {SAVED} -> {layout}")
        _close(results["ep1_to_ep2"], results["ep1_uninterrupted"], f"seed {seed} TPxPPxEPxETP {EP1_SAVED} -> {SAVED}")
        # without the moments (all, or only the experts') the first update still matches but the next ones do not
        for drop in ("all", "experts"):
            dropped = results[(RESHARDED[0], drop, False)]
            assert math.isclose(dropped[0]["pg/loss"], ref[0]["pg/loss"], rel_tol=2e-5, abs_tol=1e-6)
            assert any(not math.isclose(d["pg/loss"], r["pg/loss"], rel_tol=2e-5, abs_tol=1e-6)
                       for d, r in zip(dropped[1:], ref[1:])), (drop, dropped, ref)
            print(f"moments dropped ({drop}): pg/loss {[round(d['pg/loss'], 6) for d in dropped]} vs "
                  f"{[round(r['pg/loss'], 6) for r in ref]}")
