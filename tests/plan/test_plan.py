"""The planner's formulas and its command line, without processes.

Its byte counts are checked against the collective recorder in test_plan_agreement.py; here: the
pipeline schedule's p2p calls, megatron's buffer padding, the per-parameter memory rules, the
published parameter counts of the recipes' models, and `erc-megatron plan` on the 30B recipes
(the recipes' layouts are the planner's first choice for the GPU count their comments name).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from erc_megatron.model.config import ConfigError
from erc_megatron.plan.comm import (distopt_shard_numel, grad_buffer_numel, grad_buffer_ranges, pipeline_p2p_calls,
                                    predict_step, statistics_sizes, totals)
from erc_megatron.plan.inputs import KNOWN_ARCHITECTURES, Arch, Layout, StepShapes, Workload, load_raw_recipe
from erc_megatron.plan.memory import model_state_bytes
from erc_megatron.plan.params import Param, active_params, total_params

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_calls_follow_megatron_1f1b():
    # PP2, 3 micro-batches: stage 0 sends its 3 activations and receives 3 gradients in 4 batched
    # calls (send / send+recv / send+recv / recv), stage 1 mirrors it
    assert pipeline_p2p_calls(0, 2, 3, False) == [(1, 0), (1, 1), (1, 1), (0, 1)]
    assert pipeline_p2p_calls(1, 2, 3, False) == [(0, 1), (1, 1), (1, 1), (1, 0)]
    assert pipeline_p2p_calls(0, 2, 3, True) == [(1, 0)] * 3
    assert pipeline_p2p_calls(1, 2, 3, True) == [(0, 1)] * 3
    for pp in (2, 3, 4):
        for n in (1, 2, 5, 8):
            for fwd_only in (True, False):
                for s in range(pp):
                    calls = pipeline_p2p_calls(s, pp, n, fwd_only)
                    first, last = s == 0, s == pp - 1
                    sent = n * (not last) + (0 if fwd_only else n * (not first))  # activations, gradients
                    recv = n * (not first) + (0 if fwd_only else n * (not last))
                    assert (sum(a for a, _ in calls), sum(b for _, b in calls)) == (sent, recv), (pp, n, s, fwd_only)


def test_buffers_are_padded_as_megatron_pads_them():
    params = [Param(100, 100, True), Param(30, 30, True)]
    assert grad_buffer_numel(params, distopt=False, dp=4) == 130
    # reversed: 30 at 0, 100 at 64 (start padded to 64), end 164 padded to lcm(4, 128) = 128 -> 256
    assert grad_buffer_numel(params, distopt=True, dp=4) == 256
    assert [distopt_shard_numel(params, 4, r) for r in range(4)] == [30 + 0, 64, 36, 0]
    assert sum(distopt_shard_numel(params, 4, r) for r in range(4)) == 130


def test_memory_per_parameter_follows_the_mixed_precision_rules():
    arch = Arch.from_hf(KNOWN_ARCHITECTURES["qwen2.5-32b"])
    work = Workload(params_dtype="bfloat16")
    p, g, o = model_state_bytes(arch, Layout(tp=8, pp=2, dp=1), work, 0)
    n = p // 2
    assert (g, o) == (4 * n, 12 * n)  # bf16 params, fp32 grads, fp32 main params + 2 Adam moments: 18 B/param
    p, g, o = model_state_bytes(arch, Layout(tp=8, pp=2, dp=4, distopt=True), work, 0)
    assert abs(o - 12 * n / 4) < 12 * 256 and g >= 4 * n  # 6 + 12/d, up to the padding
    p, g, o = model_state_bytes(arch, Layout(tp=8), Workload(params_dtype="float32"), 0)
    assert o == 2 * p  # fp32: the params are the main params; Adam's two moments


@pytest.mark.parametrize("name,total,active", [("qwen2.5-32b", 32.76e9, None), ("qwen3-30b-a3b", 30.53e9, 3.35e9),
                                                ("deepseek-r1-distill-qwen-7b", 7.62e9, None)])
def test_parameter_counts_match_the_published_ones(name, total, active):
    arch = Arch.from_hf(KNOWN_ARCHITECTURES[name])
    assert abs(total_params(arch) - total) / total < 0.01, total_params(arch)
    if active:
        assert abs(active_params(arch) - active) / active < 0.02, active_params(arch)


def test_statistics_vectors_follow_the_loss_config():
    n_sum, n_max = statistics_sizes({"erc": True}, with_nll=False)
    n_sum_nll, n_max_nll = statistics_sizes({"erc": True}, with_nll=True)
    assert n_sum > 0 and n_max >= 4 and (n_sum_nll, n_max_nll) > (n_sum, n_max)


def test_moe_layer_all_to_alls_per_micro_batch():
    arch = Arch.from_hf(KNOWN_ARCHITECTURES["qwen3-30b-a3b"])
    layout = Layout(tp=2, dp=4, ep=8, sp=True, distopt=True)
    shapes = StepShapes(b=1, s=4096, old_policy=4, updates=(2, 2))
    ev = predict_step(arch, layout, Workload(), shapes)
    per_rank = totals([e for e in ev if e.rank == 5], ("role", "op"))
    # 3 all-to-alls (tokens, probabilities, combine) per MoE layer and forward, 3 more per backward
    assert per_rank[("EP", "all_to_all")]["count"] == 48 * (3 * 4 + 6 * 4)
    tokens = 4096 // 2 * 8  # sequence-parallel shard x top-k
    assert per_rank[("EP", "all_to_all")]["bytes"] == 48 * (4 + 2 * 4) * (2 * tokens * 2048 * 2 + tokens * 4)


def _plan(tmp_path: Path, recipe: str, gpus: int) -> dict:
    from erc_megatron import cli

    out = tmp_path / f"{recipe}.json"
    assert cli.main(["plan", "--config", str(REPO / "examples" / f"{recipe}.yaml"), "--gpus", str(gpus),
                     "--top", "3", "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("recipe,gpus", [("erc_dapo_qwen2p5_32b", 32), ("erc_dapo_qwen3_30b_a3b", 16)])
def test_plan_of_a_30b_recipe_recommends_the_recipes_layout(tmp_path, recipe, gpus, capsys):
    plan = _plan(tmp_path, recipe, gpus)
    out = capsys.readouterr().out
    assert "layouts fit; best first by estimated learner seconds per step" in out
    mine, best = plan["recipe_layout"], plan["layouts"]
    assert mine["fits"] and mine["memory_bytes"]["total"] <= 0.9 * 80e9
    assert mine["label"] == best[0]["label"], (mine["label"], [b["label"] for b in best])
    assert all(b["fits"] for b in best)
    # best first: estimated seconds, with layouts over 90% of the memory after all others
    keys = [(b["memory_bytes"]["total"] > 0.9 * 80e9, b["estimated_step_seconds"]) for b in best]
    assert keys == sorted(keys) and len(best) > 3
    roles = {(r["role"], r["op"]) for r in mine["collectives_per_step"]}
    assert {("DP", "reduce_scatter"), ("DP", "all_gather"), ("TP", "all_gather"), ("TP", "reduce_scatter")} <= roles
    if "a3b" in recipe:
        assert ("EP", "all_to_all") in roles
    else:
        assert ("PP", "p2p") in roles
    # the GPPO recipe of the same model runs the same layout
    dapo = load_raw_recipe(str(REPO / "examples" / f"{recipe}.yaml"))
    gppo = load_raw_recipe(str(REPO / "examples" / f"{recipe.replace('dapo', 'gppo')}.yaml"))
    assert dapo["parallel"] == gppo["parallel"] and dapo["model"] == gppo["model"]
    assert dapo["trainer"]["max_tokens_per_micro_batch"] == gppo["trainer"]["max_tokens_per_micro_batch"]


def test_plan_refuses_bad_arguments_naming_them(tmp_path):
    from erc_megatron import cli

    recipe = str(REPO / "examples" / "erc_dapo_qwen2p5_32b.yaml")
    with pytest.raises(ConfigError, match="--gpus must be >= 1"):
        cli.main(["plan", "--config", recipe, "--gpus", "0"])
    with pytest.raises(ConfigError, match="--gpu-memory-gb must be > 0"):
        cli.main(["plan", "--config", recipe, "--gpu-memory-gb", "0"])
    with pytest.raises(ConfigError, match="not divisible by tensor_model_parallel_size"):
        cli.main(["plan", "--config", recipe, "--gpus", "12"])
    with pytest.raises(ConfigError, match="--hf-config"):
        cli.main(["plan", "--config", recipe, "model.path=/nowhere/SomeModel"])


def test_weight_sync_senders():
    """rank0: later stages hop their buckets to rank 0, which broadcasts all; stage: each stage's
    leader broadcasts its own, nothing crosses stages."""
    arch = Arch.from_hf(KNOWN_ARCHITECTURES["deepseek-r1-distill-qwen-1.5b"])
    layout, shapes = Layout(tp=2, pp=2, dp=2), StepShapes(b=1, s=64, old_policy=1, updates=(1,))
    by = {}
    for dest in ("rank0", "stage"):
        ev = predict_step(arch, layout, Workload(sync_destination=dest), shapes)
        ev = [e for e in ev if e.phase == "weight_sync"]
        by[dest] = {k: v["bytes"] for k, v in totals(ev, ("role", "rank")).items()}
    stage1_leader = 4  # tp 0, dp 0 of the second stage (order tp-dp-pp)
    stage = by["stage"]
    assert by["rank0"][("weight-sync", 0)] == stage[("weight-sync", 0)] + stage[("weight-sync", stage1_leader)]
    assert by["rank0"][("PP", stage1_leader)] == by["stage"][("weight-sync", stage1_leader)]
    assert ("PP", stage1_leader) not in by["stage"]
    assert by["rank0"][("weight-sync", 0)] == total_params(arch) * 2  # every HF tensor once, in bf16


def test_buffer_layout_equals_megatrons_own():
    """megatron-core's _ParamAndGradBuffer (built on CPU, no collective issued) places every
    parameter where grad_buffer_ranges says, with and without the distributed optimizer."""
    import types

    import torch
    import torch.distributed as dist

    from erc_megatron.patches.megatron_cpu import apply_cpu_patches

    apply_cpu_patches()
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

    class Group:  # all the buffer asks of its data-parallel group
        def __init__(self, n: int):
            self.n = n

        def size(self) -> int:
            return self.n

        def rank(self) -> int:
            return 0

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for sizes in ((100, 30, 7, 250), (64, 1, 129, 3000, 5)):
            for distopt in (False, True):
                for dp in (1, 2, 4, 6):
                    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
                    buf = _ParamAndGradBuffer(
                        DistributedDataParallelConfig(use_distributed_optimizer=distopt, grad_reduce_in_fp32=True),
                        torch.float32, torch.float32, params, Group(dp), None,
                        {p: f"p{i}" for i, p in enumerate(params)}, 1.0, list(range(len(params))), False,
                        types.SimpleNamespace(tp=Group(1), dp_cp=Group(dp)))
                    ranges, numel = grad_buffer_ranges([Param(n, n, True) for n in sizes], distopt, dp)
                    assert numel == buf.numel, (sizes, distopt, dp)
                    assert sorted(ranges) == sorted(buf.param_index_map[p][:2] for p in params), (sizes, distopt, dp)
    finally:
        if started:
            dist.destroy_process_group()
