"""Hugging Face (Llama / Qwen2 / Qwen3 dense, Qwen3-MoE) tensors <-> Megatron tensors.

Layouts:
- Megatron fuses q/k/v into one `linear_qkv` whose rows are grouped by key/value head: for each
  query group g, its q heads, then k_g, then v_g (`[ng, (nq/ng + 2) * head_dim, hidden]`); HF keeps
  q_proj [nq*hd, h], k_proj / v_proj [ng*hd, h]. Biases (Qwen2) follow the same rows.
- Megatron fuses gate/up into `linear_fc1` = [gate; up] (TP rank r holds [gate_r; up_r]).
- Both use rotate-half RoPE on the same head layout and per-head q/k RMSNorm (Qwen3) before RoPE,
  so no head permutation is needed.
- Embedding and output rows are padded to `padded_vocab_size(tp)` with zero rows on import and the
  padding is dropped on export. Tied embeddings have no `lm_head.weight` on export; on import an
  `lm_head.weight` next to a tied embedding must equal it.

- Qwen3-MoE: the router `mlp.gate.weight` [experts, hidden] is Megatron's `mlp.router.weight`;
  expert e's `mlp.experts.{e}.gate_proj / up_proj / down_proj.weight` make its `linear_fc1` =
  [gate; up] and `linear_fc2`. These per-expert names are what Qwen3-MoE checkpoints hold on disk
  and what SGLang loads; transformers 5.x fuses them into 3-D `gate_up_proj` / `down_proj`
  parameters in memory only (its checkpoint conversion mapping), and writes them back per expert.

`megatron_shard_from_hf` builds one rank's TP shard straight from HF slices (a checkpoint loader
reads only those slices); `hf_to_megatron` / `megatron_to_hf` convert whole state dicts.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from erc_megatron.model.config import ConfigError, ModelConfig

from .layout import (EMBEDDING, FINAL_NORM, OUTPUT_LAYER, ROUTER, TPSplit, expert_of, fit_vocab, full_param_names,
                     split_layer_name, tp_split_of)

# architecture -> (q/k/v bias, q/k RMSNorm) it has; no other combination maps onto these HF classes
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
    "Qwen3MoeForCausalLM": (False, True),
}

_HF_LAYER_NAMES: dict[str, tuple[str, ...]] = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
    ROUTER: ("mlp.gate.weight",),
}
_HF_EXPERT_NAMES = {"linear_fc1": ("gate_proj.weight", "up_proj.weight"), "linear_fc2": ("down_proj.weight",)}
_HF_GLOBAL_NAMES: dict[str, tuple[str, ...]] = {
    EMBEDDING: ("model.embed_tokens.weight",),
    FINAL_NORM: ("model.norm.weight",),
    OUTPUT_LAYER: ("lm_head.weight",),
}
HF_EMBEDDING = "model.embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"

# fetch(hf_name, dim, start, stop): the HF tensor, or its slice [start, stop) along dim (dim None: all of it)
Fetch = Callable[[str, "int | None", int, "int | None"], torch.Tensor]


def check_hf_compatible(cfg: ModelConfig) -> None:
    """Raise ConfigError unless the config maps onto its `hf_architecture` exactly."""
    arch = cfg.hf_architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"model.hf_architecture must be one of {sorted(SUPPORTED_ARCHITECTURES)}, got {arch!r}")
    bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
    if cfg.add_qkv_bias != bias:
        raise ConfigError(f"model.add_qkv_bias={cfg.add_qkv_bias} does not fit {arch}, which has "
                          f"add_qkv_bias={bias} (attention_bias in Llama/Qwen3 also adds an o_proj bias, "
                          f"which Megatron's add_qkv_bias does not model)")
    if cfg.qk_layernorm != qk_norm:
        raise ConfigError(f"model.qk_layernorm={cfg.qk_layernorm} does not fit {arch}, which has "
                          f"qk_layernorm={qk_norm}")
    if cfg.is_moe != (arch == "Qwen3MoeForCausalLM"):
        raise ConfigError(f"model.num_moe_experts={cfg.num_moe_experts} does not fit {arch}")


def hf_names(full_name: str) -> tuple[str, ...]:
    """The HF tensor names that make up the full Megatron parameter `full_name`."""
    index, suffix = split_layer_name(full_name)
    if index is None:
        return _HF_GLOBAL_NAMES[full_name]
    expert = expert_of(suffix)
    if expert is not None:
        return tuple(f"model.layers.{index}.mlp.experts.{expert[0]}.{n}" for n in _HF_EXPERT_NAMES[expert[1]])
    return tuple(f"model.layers.{index}.{n}" for n in _HF_LAYER_NAMES[suffix])


def hf_param_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name of the model (no lm_head when tied), in Megatron order."""
    return [n for full in full_param_names(cfg) for n in hf_names(full)]


def hf_shape(hf_name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of an HF tensor of this model."""
    h, hd, ng, nq = cfg.hidden_size, cfg.kv_channels, cfg.num_query_groups, cfg.num_attention_heads
    tail = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name
    if cfg.is_moe and tail.startswith("mlp.experts.") and tail.count(".") == 4:
        f = cfg.moe_ffn_hidden_size
        proj = tail.split(".")[3]
        if proj in ("gate_proj", "up_proj"):
            return (f, h)
        if proj == "down_proj":
            return (h, f)
    if cfg.is_moe and tail == "mlp.gate.weight":
        return (cfg.num_moe_experts, h)
    if cfg.is_moe and tail.startswith("mlp."):
        raise KeyError(f"unknown Hugging Face tensor {hf_name!r} (a MoE layer has no dense MLP)")
    shapes = {
        HF_EMBEDDING: (cfg.vocab_size, h), HF_LM_HEAD: (cfg.vocab_size, h), "model.norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (nq * hd, h), "self_attn.k_proj.weight": (ng * hd, h),
        "self_attn.v_proj.weight": (ng * hd, h), "self_attn.q_proj.bias": (nq * hd,),
        "self_attn.k_proj.bias": (ng * hd,), "self_attn.v_proj.bias": (ng * hd,),
        "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,), "self_attn.o_proj.weight": (h, nq * hd),
        "mlp.gate_proj.weight": (cfg.ffn_hidden_size, h), "mlp.up_proj.weight": (cfg.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, cfg.ffn_hidden_size),
    }
    if tail not in shapes:
        raise KeyError(f"unknown Hugging Face tensor {hf_name!r}")
    return shapes[tail]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """HF q/k/v (weights or biases, rows = heads x head_dim) -> Megatron's grouped linear_qkv rows."""
    rest = q.shape[1:]
    parts = [t.reshape(num_query_groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv` for a full or a TP-local linear_qkv (the group count follows from its rows)."""
    hd = cfg.kv_channels
    q_per_group = cfg.num_attention_heads // cfg.num_query_groups
    rows_per_group = (q_per_group + 2) * hd
    if qkv.shape[0] % rows_per_group:
        raise ConfigError(f"linear_qkv has {qkv.shape[0]} rows, not a multiple of (heads per group + 2) x "
                          f"kv_channels = {rows_per_group}")
    rest = qkv.shape[1:]
    q, k, v = _grouped_qkv(qkv, cfg)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _grouped_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views [groups, q rows | kv_channels | kv_channels, ...] of a full or TP-local linear_qkv."""
    hd = cfg.kv_channels
    q_per_group = cfg.num_attention_heads // cfg.num_query_groups
    grouped = qkv.reshape(qkv.shape[0] // ((q_per_group + 2) * hd), (q_per_group + 2) * hd, *qkv.shape[1:])
    return tuple(torch.split(grouped, [q_per_group * hd, hd, hd], dim=1))  # type: ignore[return-value]


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def megatron_shard_from_hf(full_name: str, cfg: ModelConfig, fetch: Fetch, tp_rank: int = 0,
                           tp_size: int = 1) -> torch.Tensor:
    """TP rank `tp_rank`'s shard of Megatron parameter `full_name`, reading only the HF slices it needs.

    Vocabulary tensors come padded to `padded_vocab_size(tp_size)` (zero rows).
    """
    split = tp_split_of(full_name)
    names = hf_names(full_name)
    if split is TPSplit.REPLICATED:
        return fetch(names[0], None, 0, None)
    if split is TPSplit.VOCAB:
        rows = cfg.padded_vocab_size(tp_size) // tp_size
        start = tp_rank * rows
        stop = min(start + rows, cfg.vocab_size)
        real = fetch(names[0], 0, start, stop) if start < stop else None
        if real is not None and real.shape[0] == rows:
            return real
        pad_rows = rows - (0 if real is None else real.shape[0])
        like = real if real is not None else fetch(names[0], 0, 0, 1)
        pad = like.new_zeros((pad_rows, cfg.hidden_size))
        return pad if real is None else torch.cat([real, pad], dim=0)
    if split is TPSplit.COLUMN:  # linear_qkv weight / bias: whole query groups per rank
        if cfg.num_query_groups % tp_size:
            raise ConfigError(f"model.num_query_groups ({cfg.num_query_groups}) is not divisible by "
                              f"tensor_model_parallel_size ({tp_size})")
        groups = cfg.num_query_groups // tp_size
        hd = cfg.kv_channels
        q_rows = groups * (cfg.num_attention_heads // cfg.num_query_groups) * hd
        q = fetch(names[0], 0, tp_rank * q_rows, (tp_rank + 1) * q_rows)
        k = fetch(names[1], 0, tp_rank * groups * hd, (tp_rank + 1) * groups * hd)
        v = fetch(names[2], 0, tp_rank * groups * hd, (tp_rank + 1) * groups * hd)
        return fuse_qkv(q, k, v, groups)
    if split is TPSplit.GATED_COLUMN:  # tp_rank / tp_size: the expert TP ones for an expert
        rows = _divide(hf_shape(names[0], cfg)[0], tp_size, f"rows of {names[0]}")
        gate = fetch(names[0], 0, tp_rank * rows, (tp_rank + 1) * rows)
        up = fetch(names[1], 0, tp_rank * rows, (tp_rank + 1) * rows)
        return fuse_gate_up(gate, up)
    # ROW: linear_proj / linear_fc2, split on input features
    in_features = hf_shape(names[0], cfg)[1]
    cols = _divide(in_features, tp_size, f"input features of {names[0]}")
    return fetch(names[0], 1, tp_rank * cols, (tp_rank + 1) * cols)


def hf_from_megatron(full_name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """The HF (name, tensor) pairs of one full (TP-merged) Megatron parameter; padding rows dropped."""
    names = hf_names(full_name)
    split = tp_split_of(full_name)
    if split is TPSplit.VOCAB:
        return [(names[0], tensor[: cfg.vocab_size])]
    if split is TPSplit.COLUMN:
        return list(zip(names, split_qkv(tensor, cfg)))
    if split is TPSplit.GATED_COLUMN:
        return list(zip(names, split_gate_up(tensor)))
    return [(names[0], tensor)]


HFPiece = tuple[str, torch.Tensor, int, int]
"""(HF name, piece, dim, start): `piece_place(HF tensor, piece, dim, start)` is where `piece` belongs."""


def piece_place(dest: torch.Tensor, piece: torch.Tensor, dim: int, start: int) -> torch.Tensor:
    """The view of HF tensor `dest` that `piece` fills: along dim 1 (a ROW shard's columns) the
    columns from `start`; along dim 0, `dest` viewed with `piece`'s trailing shape (whole query
    groups for a QKV shard's q, k or v) from row `start`."""
    if dim == 1:
        return dest.narrow(1, start, piece.shape[1])
    return dest.view(-1, *piece.shape[1:]).narrow(0, start, piece.shape[0])


def hf_pieces_from_shard(full_name: str, shard: torch.Tensor, cfg: ModelConfig, tp_rank: int = 0,
                         tp_size: int = 1) -> list[HFPiece]:
    """Where TP rank `tp_rank`'s shard of Megatron parameter `full_name` lands in the HF tensors (the
    inverse of `megatron_shard_from_hf`, piece by piece): views of `shard`, so a caller copies each
    straight into its place (`piece_place`) without merging the shards first. Vocabulary padding
    rows land nowhere; a replicated tensor is taken from TP rank 0 only."""
    split = tp_split_of(full_name)
    names = hf_names(full_name)
    if split is TPSplit.REPLICATED:
        return [(names[0], shard, 0, 0)] if tp_rank == 0 else []
    if split is TPSplit.VOCAB:
        start = tp_rank * shard.shape[0]
        stop = min(start + shard.shape[0], cfg.vocab_size)
        return [(names[0], shard[: stop - start], 0, start)] if start < stop else []
    if split is TPSplit.COLUMN:  # whole query groups: q, k and v as [groups, rows per group, ...] views
        return [(n, t, 0, tp_rank * t.shape[0]) for n, t in zip(names, _grouped_qkv(shard, cfg))]
    if split is TPSplit.GATED_COLUMN:
        return [(n, t, 0, tp_rank * t.shape[0]) for n, t in zip(names, split_gate_up(shard))]
    return [(names[0], shard, 1, tp_rank * shard.shape[1])]  # ROW


def dict_fetch(hf_state: Mapping[str, torch.Tensor]) -> Fetch:
    """A `Fetch` over an in-memory HF state dict."""

    def fetch(name: str, dim: int | None, start: int, stop: int | None) -> torch.Tensor:
        if name not in hf_state:
            raise KeyError(f"Hugging Face state has no tensor {name!r}")
        t = hf_state[name]
        if dim is None:
            return t
        stop = t.shape[dim] if stop is None else stop
        return t.narrow(dim, start, stop - start)

    return fetch


def check_hf_names(names: set[str], cfg: ModelConfig, what: str = "Hugging Face checkpoint") -> None:
    """Raise ConfigError naming missing / unexpected tensors (a tied model may carry an lm_head)."""
    want = set(hf_param_names(cfg))
    have = set(names)
    if not cfg.untie_embeddings_and_output_weights:
        have.discard(HF_LM_HEAD)
        if HF_EMBEDDING not in names and HF_LM_HEAD in names:
            have.add(HF_EMBEDDING)  # served from lm_head by the caller
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise ConfigError(f"{what} does not match the model config ({cfg.hf_architecture}, "
                          f"{cfg.num_layers} layers, add_qkv_bias={cfg.add_qkv_bias}, "
                          f"qk_layernorm={cfg.qk_layernorm}, untie_embeddings_and_output_weights="
                          f"{cfg.untie_embeddings_and_output_weights}): missing {missing[:8]}, "
                          f"unexpected {unexpected[:8]}")


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig, tp_size: int = 1) -> dict[str, torch.Tensor]:
    """HF state dict -> full Megatron state (vocabulary padded for `tp_size`)."""
    check_hf_compatible(cfg)
    check_hf_names(set(hf_state), cfg, "Hugging Face state")
    state = dict(hf_state)
    if not cfg.untie_embeddings_and_output_weights and HF_LM_HEAD in state:
        if HF_EMBEDDING not in state:
            state[HF_EMBEDDING] = state[HF_LM_HEAD]
        elif not torch.equal(state[HF_LM_HEAD], state[HF_EMBEDDING]):
            raise ConfigError("model.untie_embeddings_and_output_weights is False but lm_head.weight differs "
                              "from model.embed_tokens.weight")
    for name in hf_param_names(cfg):
        if tuple(state[name].shape) != hf_shape(name, cfg):
            raise ConfigError(f"{name} has shape {tuple(state[name].shape)}, the model config expects "
                              f"{hf_shape(name, cfg)}")
    fetch = dict_fetch(state)
    out = {}
    for name in full_param_names(cfg):
        t = megatron_shard_from_hf(name, cfg, fetch)
        out[name] = fit_vocab(t, cfg, tp_size) if tp_split_of(name) is TPSplit.VOCAB else t
    return out


def megatron_to_hf(full_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full Megatron state -> HF state dict (no lm_head when tied)."""
    check_hf_compatible(cfg)
    missing = [n for n in full_param_names(cfg) if n not in full_state]
    if missing:
        raise ConfigError(f"full Megatron state lacks {missing[:8]}")
    return {hf: t for name in full_param_names(cfg) for hf, t in hf_from_megatron(name, full_state[name], cfg)}


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ConfigError(f"{what} ({n}) is not divisible by tensor_model_parallel_size ({parts})")
    return n // parts


__all__ = ["SUPPORTED_ARCHITECTURES", "check_hf_compatible", "check_hf_names", "dict_fetch", "fuse_gate_up",
           "fuse_qkv", "hf_from_megatron", "hf_names", "hf_param_names", "hf_shape", "hf_to_megatron",
           "megatron_shard_from_hf", "megatron_to_hf", "split_gate_up", "split_qkv"]
