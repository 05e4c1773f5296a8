"""Pure tests (no processes) of HF <-> Megatron conversion: fused QKV with GQA, fused gate/up, vocabulary
padding, tied embeddings, the checkpoint reader and config translation.

The layout checks that matter are semantic: a TP rank's shards, read the way megatron-core reads them
(`linear_qkv` viewed as [groups, (q heads per group + 2) * head_dim, hidden], `linear_fc1` chunked
into gate and up), must reproduce the HF attention / MLP output in float64 when the ranks' row-parallel
outputs are summed.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from erc_megatron.model.config import ConfigError, ModelConfig
from erc_megatron.weights import hf_convert as H
from erc_megatron.weights import layout as L


def _cfg(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=8, num_query_groups=4,
                kv_channels=12, vocab_size=37, make_vocab_size_divisible_by=8)
    base.update(kw)
    return ModelConfig(**base)


def _hf_state(cfg: ModelConfig, seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(H.hf_shape(n, cfg), generator=g, dtype=dtype) for n in H.hf_param_names(cfg)}


QWEN2 = dict(add_qkv_bias=True, hf_architecture="Qwen2ForCausalLM")
QWEN3 = dict(qk_layernorm=True, hf_architecture="Qwen3ForCausalLM")


def test_fuse_qkv_matches_grouped_layout_by_index():
    ng, qpg, hd, h = 4, 2, 3, 5
    q = torch.randn(ng * qpg * hd, h)
    k, v = torch.randn(ng * hd, h), torch.randn(ng * hd, h)
    fused = H.fuse_qkv(q, k, v, ng)
    expected = []
    for grp in range(ng):  # per query group: its q heads, then its k head, then its v head
        expected += [q[(grp * qpg + j) * hd + d] for j in range(qpg) for d in range(hd)]
        expected += [k[grp * hd + d] for d in range(hd)]
        expected += [v[grp * hd + d] for d in range(hd)]
    assert torch.equal(fused, torch.stack(expected))
    cfg = _cfg(num_attention_heads=ng * qpg, num_query_groups=ng, kv_channels=hd, hidden_size=h)
    for a, b in zip(H.split_qkv(fused, cfg), (q, k, v)):
        assert torch.equal(a, b)
    bias = [torch.randn(n) for n in (ng * qpg * hd, ng * hd, ng * hd)]
    for a, b in zip(H.split_qkv(H.fuse_qkv(*bias, ng), cfg), bias):
        assert torch.equal(a, b)


def _megatron_attention_tp(cfg, locals_, x, tp):
    """Sum over TP ranks of linear_proj_r(attention(qkv_r x)), reading shards as megatron-core does."""
    hd, qpg = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
    t = x.shape[0]
    out = 0
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    for r in range(tp):
        st = locals_[r]
        mixed = x @ st["qkv"].T + (st["qkv_bias"] if "qkv_bias" in st else 0)
        ng_local = cfg.num_query_groups // tp
        mixed = mixed.view(t, ng_local, (qpg + 2) * hd)
        q, k, v = torch.split(mixed, [qpg * hd, hd, hd], dim=-1)
        q = q.reshape(t, ng_local * qpg, hd)  # local head j uses local group j // qpg
        k = k.repeat_interleave(qpg, dim=1)
        v = v.repeat_interleave(qpg, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / hd ** 0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        ctx = torch.einsum("hts,shd->thd", probs, v).reshape(t, -1)
        out = out + ctx @ st["proj"].T
    return out


def _hf_attention(cfg, hf, x, i=0):
    hd, qpg = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
    p = f"model.layers.{i}.self_attn."
    t = x.shape[0]
    b = (lambda n: hf[p + n]) if cfg.add_qkv_bias else (lambda n: 0)
    q = (x @ hf[p + "q_proj.weight"].T + b("q_proj.bias")).view(t, -1, hd)
    k = (x @ hf[p + "k_proj.weight"].T + b("k_proj.bias")).view(t, -1, hd).repeat_interleave(qpg, dim=1)
    v = (x @ hf[p + "v_proj.weight"].T + b("v_proj.bias")).view(t, -1, hd).repeat_interleave(qpg, dim=1)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    probs = (torch.einsum("thd,shd->hts", q, k) / hd ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", probs, v).reshape(t, -1) @ hf[p + "o_proj.weight"].T


@pytest.mark.parametrize("variant", [dict(), QWEN2])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shards_reproduce_hf_attention_and_mlp(variant, tp):
    cfg = _cfg(**variant)
    hf = _hf_state(cfg, seed=tp)
    full = H.hf_to_megatron(hf, cfg, tp)
    x = torch.randn(6, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    attn, mlp = {}, 0
    for r in range(tp):
        st = L.shard_for_rank(full, cfg, r, tp, 0, 1)
        fetch = H.dict_fetch(hf)
        # the direct per-rank read (what a checkpoint loader does) gives the same shards
        for name, tensor in st.items():
            direct = H.megatron_shard_from_hf(name, cfg, fetch, r, tp)  # PP1: local names are full names
            assert torch.equal(direct, tensor), (name, r, tp)
        pre = "decoder.layers.0."
        attn[r] = {"qkv": st[pre + "self_attention.linear_qkv.weight"],
                   "proj": st[pre + "self_attention.linear_proj.weight"]}
        if cfg.add_qkv_bias:
            attn[r]["qkv_bias"] = st[pre + "self_attention.linear_qkv.bias"]
        gate, up = torch.chunk(x @ st[pre + "mlp.linear_fc1.weight"].T, 2, dim=-1)  # megatron's glu
        mlp = mlp + (F.silu(gate) * up) @ st[pre + "mlp.linear_fc2.weight"].T
    ref_mlp = (F.silu(x @ hf["model.layers.0.mlp.gate_proj.weight"].T) * (x @ hf["model.layers.0.mlp.up_proj.weight"].T)
               ) @ hf["model.layers.0.mlp.down_proj.weight"].T
    torch.testing.assert_close(mlp, ref_mlp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_megatron_attention_tp(cfg, attn, x, tp), _hf_attention(cfg, hf, x), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("variant", [dict(), QWEN2, QWEN3, dict(QWEN3, untie_embeddings_and_output_weights=False)])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_hf_megatron_round_trip_is_exact(variant, tp):
    cfg = _cfg(**variant)
    hf = _hf_state(cfg, dtype=torch.float32)
    full = H.hf_to_megatron(hf, cfg, tp)
    emb = full[L.EMBEDDING]
    assert emb.shape[0] == cfg.padded_vocab_size(tp) and not emb[cfg.vocab_size:].any()
    assert torch.equal(emb[: cfg.vocab_size], hf["model.embed_tokens.weight"])
    assert (L.OUTPUT_LAYER in full) == cfg.untie_embeddings_and_output_weights
    back = H.megatron_to_hf(full, cfg)
    assert list(back) == H.hf_param_names(cfg)
    for n, t in hf.items():
        assert torch.equal(back[n], t), n


@pytest.mark.parametrize("variant", [dict(), QWEN2, QWEN3, dict(QWEN3, untie_embeddings_and_output_weights=False)])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_hf_pieces_of_every_shard_rebuild_the_hf_tensors(variant, tp):
    """What the weight sync copies into its buckets: every TP rank's shard, cut into HF pieces, placed
    at (dim, start), rebuilds each HF tensor exactly, every element written once and no pad row kept."""
    cfg = _cfg(**variant, vocab_size=10 if tp == 4 else 37)  # TP4: ranks 2 and 3 hold only padding rows
    hf = _hf_state(cfg, seed=tp, dtype=torch.float32)
    fetch = H.dict_fetch(hf)
    rebuilt = {n: torch.full_like(t, float("nan")) for n, t in hf.items()}
    writes = {n: torch.zeros(t.shape, dtype=torch.int64) for n, t in hf.items()}
    for full_name in L.full_param_names(cfg):
        for r in range(tp):
            shard = H.megatron_shard_from_hf(full_name, cfg, fetch, r, tp)
            for name, piece, dim, start in H.hf_pieces_from_shard(full_name, shard, cfg, r, tp):
                assert piece.untyped_storage().data_ptr() == shard.untyped_storage().data_ptr(), name  # a view
                H.piece_place(rebuilt[name], piece, dim, start).copy_(piece)
                H.piece_place(writes[name], piece, dim, start).add_(1)
    for n, t in hf.items():
        assert torch.equal(rebuilt[n], t), n
        assert bool((writes[n] == 1).all()), n


def test_vocab_shards_pad_ranks_without_real_rows():
    cfg = _cfg(vocab_size=10, make_vocab_size_divisible_by=8)  # padded 32 at TP4: 8 rows per rank
    hf = _hf_state(cfg, dtype=torch.float32)
    fetch = H.dict_fetch(hf)
    shards = [H.megatron_shard_from_hf(L.EMBEDDING, cfg, fetch, r, 4) for r in range(4)]
    assert all(s.shape == (8, cfg.hidden_size) for s in shards)
    assert torch.equal(shards[0], hf["model.embed_tokens.weight"][:8])
    assert torch.equal(shards[1][:2], hf["model.embed_tokens.weight"][8:]) and not shards[1][2:].any()
    assert not shards[2].any() and not shards[3].any()


def test_tied_embeddings_and_lm_head():
    cfg = _cfg(**QWEN3, untie_embeddings_and_output_weights=False)
    hf = _hf_state(cfg, dtype=torch.float32)
    same = dict(hf, **{"lm_head.weight": hf["model.embed_tokens.weight"].clone()})
    assert torch.equal(H.hf_to_megatron(same, cfg)[L.EMBEDDING], H.hf_to_megatron(hf, cfg)[L.EMBEDDING])
    only_head = {("lm_head.weight" if n == "model.embed_tokens.weight" else n): t for n, t in hf.items()}
    assert torch.equal(H.hf_to_megatron(only_head, cfg)[L.EMBEDDING][: cfg.vocab_size], hf["model.embed_tokens.weight"])
    other = dict(hf, **{"lm_head.weight": hf["model.embed_tokens.weight"] + 1})
    with pytest.raises(ConfigError, match="lm_head.weight differs"):
        H.hf_to_megatron(other, cfg)
    assert "lm_head.weight" not in H.megatron_to_hf(H.hf_to_megatron(hf, cfg), cfg)


def test_incompatible_configs_and_checkpoints_are_refused():
    with pytest.raises(ConfigError, match="add_qkv_bias=True does not fit LlamaForCausalLM"):
        H.check_hf_compatible(_cfg(add_qkv_bias=True))
    with pytest.raises(ConfigError, match="qk_layernorm=False does not fit Qwen3ForCausalLM"):
        H.check_hf_compatible(_cfg(hf_architecture="Qwen3ForCausalLM"))
    with pytest.raises(ConfigError, match="hf_architecture must be one of"):
        H.check_hf_compatible(_cfg(hf_architecture="MistralForCausalLM"))
    cfg = _cfg(**QWEN2)
    hf = _hf_state(cfg, dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"unexpected \['model.layers.0.self_attn.o_proj.bias'\]"):
        H.hf_to_megatron(dict(hf, **{"model.layers.0.self_attn.o_proj.bias": torch.zeros(32)}), cfg)
    bad = dict(hf, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(47, 32)})
    with pytest.raises(ConfigError, match=r"up_proj.weight has shape \(47, 32\).*expects \(48, 32\)"):
        H.hf_to_megatron(bad, cfg)


def test_checkpoint_reader_reads_slices_from_sharded_checkpoints(tmp_path):
    from safetensors.torch import save_file

    from erc_megatron.weights.checkpoint_io import HFCheckpointReader

    cfg = _cfg()
    hf = _hf_state(cfg, dtype=torch.float32)
    names = list(hf)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, part in files.items():
        save_file({n: hf[n] for n in part}, str(tmp_path / fname), metadata={"format": "pt"})
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: fn for fn, part in files.items() for n in part}}, f)
    with HFCheckpointReader(str(tmp_path)) as reader:
        assert reader.names() == set(hf)
        o = "model.layers.1.self_attn.o_proj.weight"
        assert torch.equal(reader.read(o, 1, 24, 48), hf[o][:, 24:48])
        assert torch.equal(reader.read(o, 0, 3, 9), hf[o][3:9])
        assert torch.equal(reader.read(names[-1]), hf[names[-1]])
        assert reader.shape(o) == (32, 96)
        with pytest.raises(KeyError, match="no tensor"):
            reader.read("lm_head.bias")
    os.remove(tmp_path / "model.safetensors.index.json")
    with pytest.raises(FileNotFoundError, match="neither"):
        HFCheckpointReader(str(tmp_path))


@pytest.mark.parametrize("variant,tied", [(dict(), False), (QWEN2, True), (QWEN3, False)])
def test_config_translation_round_trip(variant, tied):
    from erc_megatron.weights.checkpoint_io import hf_config_to_model_config, model_config_to_hf_config

    cfg = _cfg(**variant, untie_embeddings_and_output_weights=not tied, rotary_base=5000.0, norm_epsilon=1e-5,
               max_position_embeddings=256)
    hf = model_config_to_hf_config(cfg)
    back = hf_config_to_model_config(hf, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "kv_channels", "vocab_size", "max_position_embeddings", "rotary_base", "norm_epsilon",
                  "add_qkv_bias", "qk_layernorm", "untie_embeddings_and_output_weights", "hf_architecture"):
        assert getattr(back, field) == getattr(cfg, field), field


def test_config_translation_refuses_what_megatron_cannot_model():
    from transformers import LlamaConfig

    from erc_megatron.weights.checkpoint_io import hf_config_to_model_config

    small = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ConfigError, match="rope_type 'llama3'"):
        hf_config_to_model_config(LlamaConfig(**small, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                     "original_max_position_embeddings": 64}))
    with pytest.raises(ConfigError, match="mlp_bias"):
        hf_config_to_model_config(LlamaConfig(**small, mlp_bias=True))
    with pytest.raises(ConfigError, match="o_proj bias"):
        hf_config_to_model_config(LlamaConfig(**small, attention_bias=True))
