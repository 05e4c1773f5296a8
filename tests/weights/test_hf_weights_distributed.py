"""HF checkpoints through a real TP x PP megatron-core GPTModel on 4 gloo ranks (one launch).

Models are created here with transformers (random weights, float32): Llama (untied, GQA), Qwen2
(q/k/v bias, tied), Qwen3 (q/k norm, explicit head_dim, untied and tied); vocabularies are not
multiples of 128, so padding matters. Per model and layout (TP2xPP2 for all, plus TP1xPP4 and
TP4xPP1) the worker checks: the loaded shards equal `shard_for_rank` of the converted checkpoint,
name for name as megatron names them; logits through the pipeline equal transformers' (float64
reference) within 1e-5 and padded columns are 0; gathered shards convert back to the exact HF
tensors; `iter_hf_weights` (both destinations, tight and tiny buckets, a bf16 cast) delivers
every tensor exactly once with exact values and respects the byte limit; `save_hf_checkpoint`
writes a checkpoint that the parent then loads with transformers' from_pretrained.
"""
from __future__ import annotations

import argparse
import os

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.e2e  # multi-process launches

TOKENS_SHAPE = (2, 9)
TOL = 1e-5


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights of order one (transformers' own init is ~0.02 and would make logits nearly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:  # norm weights
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def _make_tokenizer(path: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


VARIANTS = {
    # name: (config class, kwargs, layouts (tp, pp))
    "llama_untied_gqa": ("LlamaConfig", dict(vocab_size=100, hidden_size=64, intermediate_size=96,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=False, rope_theta=10000.0), [(2, 2)]),
    "qwen2_bias_tied": ("Qwen2Config", dict(vocab_size=131, hidden_size=64, intermediate_size=96,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True, rope_theta=1000000.0), [(2, 2), (1, 4)]),
    "qwen3_qknorm_untied": ("Qwen3Config", dict(vocab_size=157, hidden_size=48, intermediate_size=80,
                                                num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                                                tie_word_embeddings=False, rope_theta=5000.0), [(2, 2), (4, 1)]),
    "qwen3_qknorm_tied": ("Qwen3Config", dict(vocab_size=77, hidden_size=32, intermediate_size=64,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                              tie_word_embeddings=True, rope_theta=10000.0), [(2, 2)]),
}


def _build_variants(root: str) -> list[dict]:
    import transformers

    out = []
    for i, (name, (config_cls, kwargs, layouts)) in enumerate(VARIANTS.items()):
        config = getattr(transformers, config_cls)(num_hidden_layers=4, max_position_embeddings=64,
                                                   rms_norm_eps=1e-6, **kwargs)
        config.architectures = [config_cls.replace("Config", "ForCausalLM")]
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        _randomise(model, seed=100 + i)
        model = model.float().eval()
        path = os.path.join(root, name)
        model.save_pretrained(path)
        if i == 0:
            _make_tokenizer(path, kwargs["vocab_size"])
        tokens = torch.randint(0, kwargs["vocab_size"], TOKENS_SHAPE, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            ref32 = model(tokens).logits
            ref64 = model.double()(tokens).logits
        out.append(dict(name=name, path=path, layouts=layouts, tokens=tokens, ref32=ref32, ref64=ref64))
    return out


# ---------------------------------------------------------------- worker (runs on every rank)

def _pipeline_logits(model, tokens, cfg, g) -> torch.Tensor | None:
    """Full-vocabulary logits on the last stage (None elsewhere), by hand-rolled p2p between stages."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    if g.pp_rank > 0:
        hidden = torch.empty(s, b, cfg.hidden_size)
        dist.recv(hidden, src=dist.get_global_rank(g.pp_group, g.pp_rank - 1), group=g.pp_group)
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(tokens, position_ids, attention_mask=None)
    if g.pp_rank < g.pp_size - 1:
        dist.send(out.contiguous(), dst=dist.get_global_rank(g.pp_group, g.pp_rank + 1), group=g.pp_group)
        return None
    return gather_from_tensor_model_parallel_region(out)


def _check_buckets(buckets, limit, element_size, original, dtype, what):
    names = []
    for bucket in buckets:
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        assert nbytes <= limit or len(bucket) == 1, f"{what}: bucket of {nbytes} bytes > {limit}"
        for name, t in bucket:
            assert t.dtype == dtype and t.element_size() == element_size, (what, name, t.dtype)
            assert torch.equal(t, original[name].to(dtype)), f"{what}: {name} differs"
            names.append(name)
    return names


def _check_layout(layout, tp, pp, world_size, rank):
    """init_distributed's layout: the groups megatron's parallel_state made, with the ranks megatron's
    "tp-cp-ep-dp-pp" order gives (rank = tp_rank + tp * (dp_rank + dp * pp_rank), computed here)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ranks = dist.get_process_group_ranks
    dp = world_size // (tp * pp)
    tp_r, dp_r, pp_r = rank % tp, rank // tp % dp, rank // (tp * dp)
    at = lambda t, d, p: t + tp * (d + dp * p)  # noqa: E731
    want = {"tp": [at(t, dp_r, pp_r) for t in range(tp)], "pp": [at(tp_r, dp_r, p) for p in range(pp)],
            "dp": [at(tp_r, d, pp_r) for d in range(dp)], "cp": [rank], "ep": [rank],
            "mp": sorted(at(t, dp_r, p) for t in range(tp) for p in range(pp))}
    want["dp_cp"] = want["dp"]
    megatron = {"tp": ps.get_tensor_model_parallel_group(), "pp": ps.get_pipeline_model_parallel_group(),
                "dp": ps.get_data_parallel_group(), "cp": ps.get_context_parallel_group(),
                "dp_cp": ps.get_data_parallel_group(with_context_parallel=True),
                "ep": ps.get_expert_model_parallel_group(), "mp": ps.get_model_parallel_group()}
    for dim, group in megatron.items():
        place = getattr(layout, dim)
        assert place.group is group, (dim, tp, pp)
        assert place.ranks == ranks(group) == want[dim], (dim, tp, pp, place.ranks, want[dim])
        assert (place.size, place.rank) == (len(want[dim]), want[dim].index(rank)), (dim, tp, pp)
    assert (layout.tp.rank, layout.pp.rank, layout.dp.rank) == (ps.get_tensor_model_parallel_rank(),
                                                                 ps.get_pipeline_model_parallel_rank(),
                                                                 ps.get_data_parallel_rank()) == (tp_r, pp_r, dp_r)
    assert layout.is_first_stage == ps.is_pipeline_first_stage() == (pp_r == 0)
    assert layout.is_last_stage == ps.is_pipeline_last_stage() == (pp_r == pp - 1)
    # the embedding group: first and last stage of this pipeline; the stages between hold none
    if pp_r in (0, pp - 1):
        assert layout.embedding is not None and layout.embedding.group is ps.get_embedding_group()
        assert layout.embedding.ranks == sorted({at(tp_r, dp_r, 0), at(tp_r, dp_r, pp - 1)})
    else:
        assert layout.embedding is None
    assert (layout.rank, layout.world_size) == (rank, world_size)


def _worker(rank, world_size, variants, out_root):
    import torch.distributed as dist
    from safetensors.torch import load_file

    from erc_megatron.dist import init_distributed
    from erc_megatron.model.config import ParallelConfig
    from erc_megatron.model.gpt import build_gpt_model
    from erc_megatron.weights import convert_cli
    from erc_megatron.weights.checkpoint_io import hf_config_to_model_config, load_hf_checkpoint, save_hf_checkpoint
    from erc_megatron.weights.hf_convert import hf_param_names, hf_to_megatron, megatron_to_hf
    from erc_megatron.weights.hf_stream import is_bucket_receiver, iter_hf_weights, plan_hf_buckets
    from erc_megatron.weights.layout import gather_from_ranks, shard_for_rank
    from erc_megatron.weights.rank_params import rank_groups

    report = []
    for v in variants:
        original = load_file(os.path.join(v["path"], "model.safetensors"))
        for tp, pp in v["layouts"]:
            tag = f"{v['name']} TP{tp}xPP{pp}"
            cfg = hf_config_to_model_config(v["path"])
            layout = init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                                      cfg)
            _check_layout(layout, tp, pp, world_size, rank)
            g = rank_groups(layout)
            model = build_gpt_model(cfg, layout=layout)
            load_hf_checkpoint(model, v["path"], cfg, layout=layout)

            # 1. this rank's shard, named as megatron names it, equals the pure layout's cut
            expected = shard_for_rank(hf_to_megatron(original, cfg, tp), cfg, g.tp_rank, tp, g.pp_rank, pp)
            local = {n: p.detach().clone() for n, p in model.named_parameters()}
            assert set(local) == set(expected), (tag, sorted(set(local) ^ set(expected)))
            for n, t in expected.items():
                assert torch.equal(local[n], t), f"{tag}: {n} loaded wrong"

            # 2. logits against transformers (float64 reference)
            logits = _pipeline_logits(model, v["tokens"], cfg, g)
            max_diff = None
            if logits is not None:
                vocab = cfg.vocab_size
                assert logits.shape[-1] == cfg.padded_vocab_size(tp) > vocab, tag
                max_diff = (logits[..., :vocab].double() - v["ref64"]).abs().max().item()
                assert max_diff <= TOL, f"{tag}: logits differ from transformers (float64) by {max_diff}"
                diff32 = (logits[..., :vocab] - v["ref32"]).abs().max().item()
                assert diff32 <= TOL, f"{tag}: logits differ from transformers (float32) by {diff32}"
                assert v["ref64"].abs().max() > 1.0, f"{tag}: logits too small for the tolerance to mean much"
                assert torch.equal(logits[..., vocab:], torch.zeros_like(logits[..., vocab:])), tag

            # 3. gather every rank's shard, convert back: exact HF tensors
            states = [None] * world_size
            dist.all_gather_object(states, ((g.tp_rank, g.pp_rank), local))
            back = megatron_to_hf(gather_from_ranks(dict(states), cfg, tp, pp), cfg)
            assert set(back) == set(original), (tag, sorted(set(back) ^ set(original)))
            for n, t in original.items():
                assert torch.equal(back[n], t), f"{tag}: {n} changed in the round trip"

            # 4. iter_hf_weights: both destinations, tight and tiny buckets, a bf16 cast
            largest = max(t.numel() * 4 for t in original.values())
            delivered = {}
            for destination, limit, dtype in [("stage", largest, torch.float32), ("rank0", largest + 7, torch.float32),
                                              ("stage", 1000, torch.float32), ("rank0", 3000, torch.bfloat16)]:
                what = f"{tag} {destination} {limit} {dtype}"
                buckets = [[(n, t.clone()) for n, t in b] for b in
                           iter_hf_weights(model, cfg, limit, dtype=dtype, destination=destination)]
                receiver = is_bucket_receiver(destination)
                assert receiver == (g.tp_rank == 0 and (destination == "stage" or g.pp_rank == 0)), what
                assert receiver or not buckets, what
                names = _check_buckets(buckets, limit, dtype.itemsize, original, dtype, what)
                plan = plan_hf_buckets(cfg, pp, limit, dtype)
                if receiver:
                    want = plan[g.pp_rank] if destination == "stage" else [b for stage in plan for b in stage]
                    assert [[n for n, _ in b] for b in buckets] == [[s.name for s in b] for b in want], what
                delivered[(destination, limit)] = names
            all_names = [None] * world_size
            dist.all_gather_object(all_names, delivered)
            for key in delivered:
                got = [n for r in range(world_size) for n in all_names[r][key]]
                assert sorted(got) == sorted(hf_param_names(cfg)), f"{tag} {key}: not every tensor exactly once"

            # 5. export (several shards for one layout, to exercise the index file)
            out_dir = os.path.join(out_root, f"{v['name']}_tp{tp}pp{pp}")
            shard_bytes = 20_000 if (tp, pp) == (2, 2) else 1 << 30
            save_hf_checkpoint(model, cfg, out_dir, tokenizer_dir=v["path"], max_shard_bytes=shard_bytes)
            if max_diff is not None:
                print(f"{tag} rank {rank}: max |logits - float64 reference| = {max_diff:.2e}", flush=True)
            report.append(dict(tag=tag, out_dir=out_dir, max_diff=max_diff, rank=rank,
                               buckets={k: len(n) for k, n in delivered.items()}))

    # 6. the convert command, under the same 4 ranks, with its own round-trip check
    v = variants[0]
    args = argparse.Namespace(hf_dir=v["path"], out=os.path.join(out_root, "cli"), tp=2, pp=2,
                              params_dtype="float32", max_shard_bytes=50_000, check=True)
    status = convert_cli.run(args)
    assert status == 0, f"convert --check reported differences (status {status})"
    return report


# ---------------------------------------------------------------- the test

def test_hf_megatron_roundtrip_tp_pp(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from erc_megatron.weights.checkpoint_io import HFCheckpointReader
    from erc_megatron.weights.convert_cli import compare_checkpoints

    variants = _build_variants(str(tmp_path / "hf"))
    reports = run_distributed(_worker, 4, args=(variants, str(tmp_path / "out")))

    # logits were checked on every last-stage rank
    checked = [r for rank_reports in reports for r in rank_reports if r["max_diff"] is not None]
    assert {r["tag"] for r in checked} == {f"{v['name']} TP{tp}xPP{pp}" for v in variants for tp, pp in v["layouts"]}
    # the exports load with transformers and reproduce the original tensors and logits
    for v in variants:
        original = load_file(os.path.join(v["path"], "model.safetensors"))
        for tp, pp in v["layouts"]:
            out_dir = str(tmp_path / "out" / f"{v['name']}_tp{tp}pp{pp}")
            assert compare_checkpoints(v["path"], out_dir) == []
            with HFCheckpointReader(out_dir) as reader:
                assert reader.names() == set(original)
            if (tp, pp) == (2, 2):
                assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json"))
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager")
            with torch.no_grad():
                logits = reloaded.double()(v["tokens"]).logits
            assert torch.equal(logits, v["ref64"]), f"{v['name']}: reloaded export gives other logits"
    tok_dir = str(tmp_path / "out" / f"{variants[0]['name']}_tp2pp2")
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    assert tok("w3 w7 w1")["input_ids"] == [3, 7, 1]
    assert compare_checkpoints(variants[0]["path"], str(tmp_path / "out" / "cli")) == []
