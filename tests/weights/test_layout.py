"""Pure tests (no processes) of the Megatron TP x PP layout: names, stages, TP cuts, vocabulary padding."""
from __future__ import annotations

import itertools

import pytest
import torch

from erc_megatron.model.config import ConfigError, ModelConfig
from erc_megatron.weights import layout as L
from erc_megatron.weights.hf_stream import HFTensorSpec, pack_buckets, plan_hf_buckets, stage_hf_tensors
from erc_megatron.weights.hf_convert import hf_param_names


def _cfg(**kw) -> ModelConfig:
    base = dict(num_layers=4, hidden_size=32, ffn_hidden_size=48, num_attention_heads=8, num_query_groups=4,
                kv_channels=12, vocab_size=101, make_vocab_size_divisible_by=8)
    base.update(kw)
    return ModelConfig(**base)


def _random_full(cfg: ModelConfig, tp: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(L.full_param_shape(n, cfg, tp), generator=g) for n in L.full_param_names(cfg)}


VARIANTS = [dict(), dict(add_qkv_bias=True), dict(qk_layernorm=True, untie_embeddings_and_output_weights=False),
            dict(add_qkv_bias=True, untie_embeddings_and_output_weights=False)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp,pp", list(itertools.product((1, 2, 4), (1, 2, 4))))
def test_shard_and_gather_round_trip(variant, tp, pp):
    cfg = _cfg(**variant)
    full = _random_full(cfg, tp)
    states = {(t, p): L.shard_for_rank(full, cfg, t, tp, p, pp) for t in range(tp) for p in range(pp)}
    back = L.gather_from_ranks(states, cfg, tp, pp)
    assert back.keys() == full.keys()
    for name in full:
        assert torch.equal(back[name], full[name]), name
    per_stage = cfg.num_layers // pp
    for (t, p), state in states.items():
        # pipeline-local layer numbers, global layers of this stage only
        layer_ids = {L.split_layer_name(n)[0] for n in state} - {None}
        assert layer_ids == set(range(per_stage))
        assert (L.EMBEDDING in state) == (p == 0)
        assert (L.FINAL_NORM in state) == (p == pp - 1)
        has_output = p == pp - 1 and (cfg.untie_embeddings_and_output_weights or pp > 1)
        assert (L.OUTPUT_LAYER in state) == has_output
        for n, tensor in state.items():
            idx, suffix = L.split_layer_name(n)
            source = L.layer_name(p * per_stage + idx, suffix) if idx is not None else n
            if n == L.OUTPUT_LAYER and not cfg.untie_embeddings_and_output_weights:
                source = L.EMBEDDING  # the last stage's copy of a tied embedding
            split = L.tp_split_of(n)
            want = full[source]
            rows_per_rank = L.local_shape(tuple(want.shape), split, tp)
            assert tuple(tensor.shape) == rows_per_rank, n
            # rebuild the expected shard by explicit index arithmetic, independent of split_tp
            if split is L.TPSplit.REPLICATED:
                expected = want
            elif split is L.TPSplit.ROW:
                c = want.shape[1] // tp
                expected = want[:, t * c:(t + 1) * c]
            elif split is L.TPSplit.GATED_COLUMN:
                f = cfg.ffn_hidden_size // tp
                expected = torch.cat([want[t * f:(t + 1) * f], want[cfg.ffn_hidden_size + t * f:
                                                                     cfg.ffn_hidden_size + (t + 1) * f]])
            else:
                r = want.shape[0] // tp
                expected = want[t * r:(t + 1) * r]
            assert torch.equal(tensor, expected), (n, t, p)


def test_fc1_tp_shard_is_not_a_contiguous_split():
    cfg = _cfg()
    fc1 = torch.arange(2 * cfg.ffn_hidden_size, dtype=torch.float64)[:, None].expand(-1, 3)
    shards = L.split_tp(fc1, L.TPSplit.GATED_COLUMN, 2)
    assert not torch.equal(shards[0], fc1[: cfg.ffn_hidden_size])
    assert shards[0][:, 0].tolist() == list(range(24)) + list(range(48, 72))
    assert torch.equal(L.merge_tp(shards, L.TPSplit.GATED_COLUMN), fc1)


def test_vocabulary_padding_follows_tp_size():
    cfg = _cfg(vocab_size=101, make_vocab_size_divisible_by=8)
    emb = torch.randn(101, cfg.hidden_size)
    for tp, padded in ((1, 104), (2, 112), (4, 128)):
        fitted = L.fit_vocab(emb, cfg, tp)
        assert fitted.shape[0] == padded == cfg.padded_vocab_size(tp)
        assert torch.equal(fitted[:101], emb) and not fitted[101:].any()
    # a TP4-padded full state cut for TP2 drops only padding rows
    full4 = _random_full(cfg, 4)
    full4[L.EMBEDDING][101:] = 0
    state = L.shard_for_rank(full4, cfg, 1, 2, 0, 1)
    assert torch.equal(state[L.EMBEDDING], full4[L.EMBEDDING][56:112])
    with pytest.raises(ConfigError, match="fewer than model.vocab_size"):
        L.fit_vocab(emb[:100], cfg, 1)


def test_transformer_engine_names_map_to_local_spec():
    assert L.canonical_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.3.input_layernorm.weight"
    assert L.canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert L.canonical_name("decoder.layers.0.mlp.linear_fc1.weight") == "decoder.layers.0.mlp.linear_fc1.weight"
    assert L.tp_split_of("decoder.layers.1.mlp.linear_fc1.layer_norm_weight") is L.TPSplit.REPLICATED
    assert L.tp_split_of("decoder.layers.1.mlp.linear_fc1.weight") is L.TPSplit.GATED_COLUMN
    with pytest.raises(KeyError, match="unknown megatron parameter"):
        L.tp_split_of("decoder.layers.1.mlp.shared_experts.linear_fc1.weight")


def test_bad_inputs_name_what_is_wrong():
    cfg = _cfg()
    full = _random_full(cfg, 1)
    with pytest.raises(ConfigError, match=r"num_layers \(4\) is not divisible by pipeline_model_parallel_size \(3\)"):
        L.shard_for_rank(full, cfg, 0, 1, 0, 3)
    with pytest.raises(ConfigError,
                       match=r"num_query_groups \(4\) is not divisible by tensor_model_parallel_size \(8\)"):
        L.shard_for_rank(full, cfg, 0, 8, 0, 1)
    missing = dict(full)
    missing.pop("decoder.layers.2.mlp.linear_fc2.weight")
    missing["decoder.layers.2.mlp.linear_fc2.bias"] = torch.zeros(cfg.hidden_size)
    with pytest.raises(ConfigError, match=r"missing \['decoder.layers.2.mlp.linear_fc2.weight'\], "
                                          r"unexpected \['decoder.layers.2.mlp.linear_fc2.bias'\]"):
        L.shard_for_rank(missing, cfg, 0, 1, 0, 1)
    wrong = dict(full)
    wrong["decoder.layers.0.self_attention.linear_proj.weight"] = torch.zeros(cfg.hidden_size, 7)
    with pytest.raises(ConfigError, match=r"linear_proj.weight has shape \(32, 7\).*expects \(32, 96\)"):
        L.shard_for_rank(wrong, cfg, 0, 1, 0, 1)
    with pytest.raises(ConfigError, match="tensor-parallel rank 2 is outside"):
        L.shard_for_rank(full, cfg, 2, 2, 0, 1)


def test_gather_refuses_out_of_sync_tied_copies():
    cfg = _cfg(untie_embeddings_and_output_weights=False)
    full = _random_full(cfg, 2)
    states = {(t, p): L.shard_for_rank(full, cfg, t, 2, p, 2) for t in range(2) for p in range(2)}
    states[(1, 1)][L.OUTPUT_LAYER] = states[(1, 1)][L.OUTPUT_LAYER] + 1e-3
    with pytest.raises(ValueError, match="out of sync"):
        L.gather_from_ranks(states, cfg, 2, 2)
    del states[(1, 1)]
    with pytest.raises(ConfigError, match="all \\(tp_rank, pp_rank\\)"):
        L.gather_from_ranks(states, cfg, 2, 2)


# ---------------------------------------------------------------- bucket plans

def test_pack_buckets_respects_limit_and_order():
    g = torch.Generator().manual_seed(3)
    specs = [HFTensorSpec(f"t{i}", (int(torch.randint(1, 40, (1,), generator=g)),)) for i in range(60)]
    for limit in (4, 40, 100, 1000, 10**9):
        buckets = pack_buckets(specs, limit, 4)
        assert [s for b in buckets for s in b] == specs
        for b in buckets:
            size = sum(s.numel * 4 for s in b)
            assert size <= limit or len(b) == 1
        # greedy: the next bucket's first tensor would not have fitted
        for a, b in zip(buckets, buckets[1:]):
            assert sum(s.numel * 4 for s in a) + b[0].numel * 4 > limit
    with pytest.raises(ConfigError, match="bucket_bytes must be > 0"):
        pack_buckets(specs, 0, 4)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("pp", [1, 2, 4])
def test_bucket_plan_covers_every_hf_tensor_once(tied, pp):
    cfg = _cfg(untie_embeddings_and_output_weights=not tied, qk_layernorm=True,
               hf_architecture="Qwen3ForCausalLM")
    plan = plan_hf_buckets(cfg, pp, 5000, torch.bfloat16)
    names = [s.name for stage in plan for b in stage for s in b]
    assert names == hf_param_names(cfg)
    assert ("lm_head.weight" in names) == (not tied)
    assert [s.name for s in stage_hf_tensors(cfg, 0, pp)][0] == "model.embed_tokens.weight"
    last = "model.norm.weight" if tied else "lm_head.weight"
    assert [s.name for s in stage_hf_tensors(cfg, pp - 1, pp)][-1] == last
    for stage in plan:
        for b in stage:
            assert sum(s.numel * 2 for s in b) <= 5000 or len(b) == 1
