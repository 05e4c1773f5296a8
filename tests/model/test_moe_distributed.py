"""Qwen3-MoE checkpoints through real expert-parallel megatron-core models on 4 gloo ranks (one launch).

Two tiny Qwen3MoeForCausalLM checkpoints are made with transformers (see moe_models.py: renormalised
top-2 of 4 experts, untied; plain top-3 of 8 experts, tied). Per model and layout -- EP2 x TP2
(sequence parallel, expert TP 2, all-to-all dispatcher), EP2 x PP2 (all-to-all), EP2 x TP2 with
expert TP 1 (all-gather dispatcher), EP4 -- the worker checks: each rank's loaded shards equal
`shard_for_rank` of the converted checkpoint, name for name as megatron names them; logits equal
transformers' (float64 and float32 references) within 1e-5 and padded columns are 0; every rank's
shards, gathered and converted back, give the checkpoint's tensors bit for bit; `save_hf_checkpoint`
writes per-expert tensors that the parent loads with transformers' from_pretrained (same logits).
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.model.moe_models import make_moe_checkpoint

pytestmark = pytest.mark.e2e  # multi-process launches

TOL = 1e-5
# (tp, pp, ep, etp, dispatcher) per variant
LAYOUTS = {
    "qwen3moe_norm_topk": [(2, 1, 2, 2, "alltoall"), (1, 2, 2, 1, "alltoall")],
    "qwen3moe_pre_softmax": [(2, 1, 2, 1, "allgather"), (1, 1, 4, 1, "alltoall")],
}


def _check_uneven_collectives(rank):
    """The gloo fallback for uneven list all-gather / reduce-scatter: right values, and the recorder
    sees each user-level call once with the caller's bytes (the padded collective folded in)."""
    import torch.distributed as dist

    from erc_megatron.patches import torch_distributed_hooks as hooks
    from erc_megatron.patches.megatron_moe_cpu import apply_moe_cpu_patches

    apply_moe_cpu_patches()
    records = []

    class Recorder:
        def before_call(self, op):
            return None

        def after_call(self, record, token):
            records.append((record.op, record.bytes_in, record.bytes_out))

        def after_wait(self, *args):
            pass

    rows = [1, 3, 2, 4]
    listener = Recorder()
    hooks.add_listener(listener)
    try:
        outs = [torch.empty(n, 2) for n in rows]
        dist.all_gather(outs, torch.full((rows[rank], 2), float(rank + 1)))
        scattered = torch.empty(rows[rank], 2)
        dist.reduce_scatter(scattered, [torch.full((n, 2), float((rank + 1) * (r + 1))) for r, n in enumerate(rows)])
    finally:
        hooks.remove_listener(listener)
    for r, t in enumerate(outs):
        assert torch.equal(t, torch.full((rows[r], 2), float(r + 1))), (r, t)
    assert torch.equal(scattered, torch.full((rows[rank], 2), float(10 * (rank + 1)))), scattered  # sum_k (k+1)(r+1)
    total = sum(rows) * 2 * 4
    assert records == [("all_gather", rows[rank] * 8, total), ("reduce_scatter", total, rows[rank] * 8)], records
    return records


def _worker(rank, world_size, variants, out_root):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from erc_megatron.dist import init_distributed
    from erc_megatron.model.config import ParallelConfig
    from erc_megatron.model.gpt import build_gpt_model
    from erc_megatron.weights.checkpoint_io import hf_config_to_model_config, load_hf_checkpoint, save_hf_checkpoint
    from erc_megatron.weights.hf_convert import hf_to_megatron, megatron_to_hf
    from erc_megatron.weights.layout import gather_from_ranks, shard_for_rank
    from erc_megatron.weights.rank_params import rank_groups
    from tests.weights.test_hf_weights_distributed import _pipeline_logits

    report = [dict(uneven=_check_uneven_collectives(rank), tag=None, max_diff=None)]
    for v in variants:
        original = load_file(os.path.join(v["path"], "model.safetensors"))
        for tp, pp, ep, etp, dispatcher in LAYOUTS[v["name"]]:
            tag = f"{v['name']} TP{tp}xPP{pp}xEP{ep}xETP{etp} {dispatcher}"
            cfg = hf_config_to_model_config(v["path"], moe_token_dispatcher_type=dispatcher)
            sp = tp > 1 and ep > 1
            parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
            parallel.sequence_parallel = sp  # megatron requires it with EP x TP (a field of ParallelConfig on main)
            init_distributed(parallel, cfg)
            g = rank_groups()
            assert (g.ep_rank, g.ep_size, g.etp_size) == (ps.get_expert_model_parallel_rank(), ep, etp), tag
            model = build_gpt_model(cfg, sequence_parallel=sp)
            model.eval()
            load_hf_checkpoint(model, v["path"], cfg)

            # 1. this rank's shard (its experts, cut over expert TP) equals the pure layout's cut
            expected = shard_for_rank(hf_to_megatron(original, cfg, tp), cfg, g.tp_rank, tp, g.pp_rank, pp,
                                      ep_rank=g.ep_rank, ep_size=ep, etp_rank=g.etp_rank, etp_size=etp)
            local = {n: p.detach().clone() for n, p in model.named_parameters()}
            assert set(local) == set(expected), (tag, sorted(set(local) ^ set(expected)))
            for n, t in expected.items():
                assert torch.equal(local[n], t), f"{tag}: {n} loaded wrong"
            n_experts = sum(1 for n in local if n.startswith("decoder.layers.0.mlp.experts.") and "fc1" in n)
            assert n_experts == cfg.num_moe_experts // ep, tag

            # 2. logits against transformers
            logits = _pipeline_logits(model, v["tokens"], cfg, g)
            max_diff = None
            if logits is not None:
                vocab = cfg.vocab_size
                max_diff = (logits[..., :vocab].double() - v["ref64"]).abs().max().item()
                assert max_diff <= TOL, f"{tag}: logits differ from transformers (float64) by {max_diff}"
                diff32 = (logits[..., :vocab] - v["ref32"]).abs().max().item()
                assert diff32 <= TOL, f"{tag}: logits differ from transformers (float32) by {diff32}"
                assert v["ref64"].abs().max() > 1.0, f"{tag}: logits too small for the tolerance to mean much"
                assert torch.equal(logits[..., vocab:], torch.zeros_like(logits[..., vocab:])), tag

            # 3. every rank's shard, gathered and converted back: the checkpoint's tensors, bit for bit
            states = [None] * world_size
            dist.all_gather_object(states, ((g.tp_rank, g.pp_rank, g.ep_rank, g.etp_rank), local))
            back = megatron_to_hf(gather_from_ranks(dict(states), cfg, tp, pp, ep_size=ep, etp_size=etp), cfg)
            assert set(back) == set(original), (tag, sorted(set(back) ^ set(original)))
            for n, t in original.items():
                assert torch.equal(back[n], t), f"{tag}: {n} changed in the round trip"

            # 4. export (collective): per-expert names, several files
            out_dir = os.path.join(out_root, f"{v['name']}_tp{tp}pp{pp}ep{ep}etp{etp}")
            save_hf_checkpoint(model, cfg, out_dir, max_shard_bytes=30_000)
            if max_diff is not None:
                print(f"{tag} rank {rank}: max |logits - float64 reference| = {max_diff:.2e}", flush=True)
            report.append(dict(tag=tag, out_dir=out_dir, max_diff=max_diff))
    return report


def test_qwen3_moe_expert_parallel_logits_and_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from erc_megatron.weights.checkpoint_io import HFCheckpointReader

    variants = [make_moe_checkpoint(str(tmp_path / "hf"), name, seed=i) for i, name in enumerate(LAYOUTS)]
    reports = run_distributed(_worker, 4, args=(variants, str(tmp_path / "out")))

    assert all(rank_reports[0]["uneven"] for rank_reports in reports)
    checked = {r["tag"]: r["max_diff"] for rank_reports in reports for r in rank_reports if r["max_diff"] is not None}
    assert len(checked) == sum(len(v) for v in LAYOUTS.values()), sorted(checked)
    print("max |logits - transformers float64|:", {k: f"{d:.1e}" for k, d in checked.items()})
    for v in variants:
        original = load_file(os.path.join(v["path"], "model.safetensors"))
        assert "model.layers.1.mlp.experts.0.gate_proj.weight" in original  # what transformers writes on disk
        for tp, pp, ep, etp, _ in LAYOUTS[v["name"]]:
            out_dir = str(tmp_path / "out" / f"{v['name']}_tp{tp}pp{pp}ep{ep}etp{etp}")
            with HFCheckpointReader(out_dir) as reader:
                assert reader.names() == set(original)
                for n, t in original.items():
                    assert torch.equal(reader.read(n), t), f"{out_dir}: {n} differs"
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(
                out_dir, attn_implementation="eager", experts_implementation="eager")
            with torch.no_grad():
                logits = reloaded.double()(v["tokens"]).logits
            assert torch.equal(logits, v["ref64"]), f"{out_dir}: reloaded export gives other logits"
