"""Where each megatron-core GPTModel parameter lives in a TP x PP layout, and how to cut and join it.

A "full Megatron" state dict is what a TP1 x PP1 model would hold: local-spec names, global layer
numbers, the vocabulary padded for the layout in question (`ModelConfig.padded_vocab_size(tp)`).
`shard_for_rank` cuts it into one rank's state (pipeline-local layer numbers, TP shards) and
`gather_from_ranks` joins every rank's state back.

Facts about megatron-core (checked on 0.16.1 with the local spec, TP1/2 x PP1/2):
- Each pipeline stage numbers its layers from 0 (`decoder.layers.{local}`); stage p holds global
  layers [p * L/pp, (p+1) * L/pp).
- The first stage holds `embedding.word_embeddings.weight`, the last `decoder.final_layernorm.weight`
  and `output_layer.weight`. With tied embeddings and PP=1 there is no `output_layer.weight`; with
  PP>1 the last stage keeps its own copy of the embedding as `output_layer.weight` (megatron zeroes
  it and all-reduces it from the first stage at build time, then all-reduces its gradients), so a
  loader must fill both copies.
- TP splits: embedding/output rows (vocabulary); linear_qkv rows (query groups are outermost, so a
  contiguous split); linear_fc1 rows, but the TP1 tensor is [gate; up] while rank r holds
  [gate_r; up_r], so its split is NOT contiguous; linear_proj / linear_fc2 columns; norms replicated.
- Under Transformer Engine the pre-attention / pre-MLP norms are fused into the next linear layer
  (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`); `canonical_name` maps them.

MoE layers (local spec, SequentialMLP experts; checked on 0.16.1 at EP1/2 x TP1/2 x PP1/2):
- `mlp.router.weight` [experts, hidden] is replicated on every rank (TP and EP).
- Expert e's `linear_fc1` / `linear_fc2` (same [gate; up] / row layout as the dense MLP) live on
  expert-parallel rank e // (experts / EP) as `mlp.experts.local_experts.{e % (experts / EP)}`;
  the full state numbers experts globally. They are split over the expert tensor-parallel group
  (size ETP, default TP), not the TP group.
- With Transformer Engine and grouped GEMM experts are named differently (`experts.linear_fc1.weight{e}`);
  erc-megatron builds SequentialMLP experts (moe_grouped_gemm=False) on both paths.
"""
from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from erc_megatron.model.config import ConfigError, ModelConfig

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"


class TPSplit(enum.Enum):
    """How a parameter is divided over tensor-parallel ranks."""

    REPLICATED = "replicated"
    VOCAB = "vocab"  # rows, over the padded vocabulary
    COLUMN = "column"  # rows (output features), contiguous
    GATED_COLUMN = "gated_column"  # rows of [gate; up], each half split on its own
    ROW = "row"  # columns (input features)


# Per-layer parameters of the local spec (`layer_param_suffixes` drops those a config lacks).
_LAYER_PARAMS: dict[str, TPSplit] = {
    "input_layernorm.weight": TPSplit.REPLICATED,
    "self_attention.linear_qkv.weight": TPSplit.COLUMN,
    "self_attention.linear_qkv.bias": TPSplit.COLUMN,
    "self_attention.q_layernorm.weight": TPSplit.REPLICATED,
    "self_attention.k_layernorm.weight": TPSplit.REPLICATED,
    "self_attention.linear_proj.weight": TPSplit.ROW,
    "pre_mlp_layernorm.weight": TPSplit.REPLICATED,
    "mlp.linear_fc1.weight": TPSplit.GATED_COLUMN,
    "mlp.linear_fc2.weight": TPSplit.ROW,
}
_GLOBAL_PARAMS: dict[str, TPSplit] = {
    EMBEDDING: TPSplit.VOCAB,
    FINAL_NORM: TPSplit.REPLICATED,
    OUTPUT_LAYER: TPSplit.VOCAB,
}
# Transformer Engine spec name -> local spec name (same tensor, norm fused into the next linear).
TE_TO_LOCAL: dict[str, str] = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
ROUTER = "mlp.router.weight"
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_EXPERT_SPLIT = {"linear_fc1": TPSplit.GATED_COLUMN, "linear_fc2": TPSplit.ROW}
_DENSE_MLP = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")


def expert_suffix(expert: int, linear: str) -> str:
    """'mlp.experts.local_experts.{expert}.{linear}.weight' (linear: linear_fc1 or linear_fc2)."""
    return f"mlp.experts.local_experts.{expert}.{linear}.weight"


def expert_of(name: str) -> tuple[int, str] | None:
    """(expert index, 'linear_fc1' | 'linear_fc2') of an expert parameter name or suffix; None otherwise."""
    _, suffix = split_layer_name(name)
    m = _EXPERT_RE.match(suffix)
    return (int(m.group(1)), m.group(2)) if m else None


def is_expert_param(name: str) -> bool:
    """Whether `name` is an expert weight (split over the expert TP group, held by one EP rank)."""
    return expert_of(name) is not None


def layer_param_suffixes(cfg: ModelConfig, ep_rank: int = 0, ep_size: int = 1, *,
                         local_names: bool = False) -> list[str]:
    """The per-layer parameter names (after `decoder.layers.{i}.`) this config has, in model order.

    A MoE layer holds the experts of expert-parallel rank `ep_rank` (all of them with ep_size 1),
    numbered globally, or as that rank's GPTModel numbers them with `local_names`.
    """
    out = []
    for suffix in _LAYER_PARAMS:
        if suffix.endswith("linear_qkv.bias") and not cfg.add_qkv_bias:
            continue
        if ("q_layernorm" in suffix or "k_layernorm" in suffix) and not cfg.qk_layernorm:
            continue
        if suffix in _DENSE_MLP and cfg.is_moe:
            continue
        out.append(suffix)
    if cfg.is_moe:
        out.append(ROUTER)
        for e in local_experts(cfg, ep_rank, ep_size):
            index = e - local_experts(cfg, ep_rank, ep_size).start if local_names else e
            out += [expert_suffix(index, "linear_fc1"), expert_suffix(index, "linear_fc2")]
    return out


def local_experts(cfg: ModelConfig, ep_rank: int, ep_size: int) -> range:
    """Global indices of the experts expert-parallel rank `ep_rank` holds."""
    if not cfg.is_moe:
        return range(0)
    if ep_size < 1 or cfg.num_moe_experts % ep_size:
        raise ConfigError(f"model.num_moe_experts ({cfg.num_moe_experts}) is not divisible by "
                          f"expert_model_parallel_size ({ep_size})")
    if not 0 <= ep_rank < ep_size:
        raise ConfigError(f"expert-parallel rank {ep_rank} is outside [0, {ep_size})")
    per_rank = cfg.num_moe_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def split_layer_name(name: str) -> tuple[int | None, str]:
    """'decoder.layers.3.mlp.linear_fc1.weight' -> (3, 'mlp.linear_fc1.weight'); others -> (None, name)."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def layer_name(index: int, suffix: str) -> str:
    return f"decoder.layers.{index}.{suffix}"


def canonical_name(name: str) -> str:
    """A model parameter name in local-spec form (maps Transformer Engine's fused-norm names)."""
    index, suffix = split_layer_name(name)
    if index is None:
        return name
    return layer_name(index, TE_TO_LOCAL.get(suffix, suffix))


def tp_split_of(name: str) -> TPSplit:
    """How the (canonical) parameter `name` is divided over TP ranks."""
    index, suffix = split_layer_name(canonical_name(name))
    if index is not None:
        if suffix == ROUTER:
            return TPSplit.REPLICATED
        expert = _EXPERT_RE.match(suffix)
        if expert:
            return _EXPERT_SPLIT[expert.group(2)]
    table = _LAYER_PARAMS if index is not None else _GLOBAL_PARAMS
    if suffix not in table:
        raise KeyError(f"unknown megatron parameter {name!r}")
    return table[suffix]


def full_param_names(cfg: ModelConfig) -> list[str]:
    """Names of a full (TP1 x PP1) Megatron state dict, in model order."""
    names = [EMBEDDING]
    suffixes = layer_param_suffixes(cfg)
    names += [layer_name(i, s) for i in range(cfg.num_layers) for s in suffixes]
    names.append(FINAL_NORM)
    if cfg.untie_embeddings_and_output_weights:
        names.append(OUTPUT_LAYER)
    return names


def full_param_shape(name: str, cfg: ModelConfig, tp_size: int = 1) -> tuple[int, ...]:
    """Shape of `name` in the full Megatron state (vocabulary padded for `tp_size`)."""
    h, hd = cfg.hidden_size, cfg.kv_channels
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * hd
    _, suffix = split_layer_name(name)
    if suffix == ROUTER:
        return (cfg.num_moe_experts, h)
    expert = expert_of(suffix)
    if expert is not None:
        f = cfg.moe_ffn_hidden_size
        return (2 * f, h) if expert[1] == "linear_fc1" else (h, f)
    shapes = {
        EMBEDDING: (cfg.padded_vocab_size(tp_size), h),
        OUTPUT_LAYER: (cfg.padded_vocab_size(tp_size), h),
        FINAL_NORM: (h,),
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_qkv.bias": (qkv_rows,),
        "self_attention.q_layernorm.weight": (hd,),
        "self_attention.k_layernorm.weight": (hd,),
        "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * hd),
        "mlp.linear_fc1.weight": (2 * cfg.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, cfg.ffn_hidden_size),
    }
    return shapes[suffix]


def local_shape(full_shape: tuple[int, ...], split: TPSplit, tp_size: int) -> tuple[int, ...]:
    """Shape of one rank's shard of a tensor of `full_shape`."""
    if split is TPSplit.REPLICATED:
        return full_shape
    dim = 1 if split is TPSplit.ROW else 0
    if full_shape[dim] % tp_size:
        raise ConfigError(f"dimension {dim} of a {split.value}-parallel tensor of shape {full_shape} is not "
                          f"divisible by tensor_model_parallel_size ({tp_size})")
    return tuple(n // tp_size if d == dim else n for d, n in enumerate(full_shape))


def check_shardable(cfg: ModelConfig, tp_size: int, pp_size: int, ep_size: int = 1,
                    etp_size: int | None = None) -> None:
    """Raise ConfigError if the model cannot be cut into tp_size x pp_size (x ep_size x etp_size experts)."""
    problems = []
    etp_size = tp_size if etp_size is None else etp_size
    if min(tp_size, pp_size, ep_size, etp_size) < 1:
        problems.append(f"tensor_model_parallel_size ({tp_size}), pipeline_model_parallel_size ({pp_size}), "
                        f"expert_model_parallel_size ({ep_size}) and expert_tensor_parallel_size ({etp_size}) "
                        f"must be >= 1")
    else:
        fields = ("num_attention_heads", "num_query_groups") + (() if cfg.is_moe else ("ffn_hidden_size",))
        for field in fields:
            if getattr(cfg, field) % tp_size:
                problems.append(f"model.{field} ({getattr(cfg, field)}) is not divisible by "
                                f"tensor_model_parallel_size ({tp_size})")
        if not cfg.is_moe and (ep_size > 1 or etp_size != tp_size):
            problems.append(f"expert_model_parallel_size ({ep_size}) / expert_tensor_parallel_size ({etp_size}) "
                            f"need a MoE model (model.num_moe_experts)")
        if cfg.is_moe and cfg.num_moe_experts % ep_size:
            problems.append(f"model.num_moe_experts ({cfg.num_moe_experts}) is not divisible by "
                            f"expert_model_parallel_size ({ep_size})")
        if cfg.is_moe and cfg.moe_ffn_hidden_size % etp_size:
            problems.append(f"model.moe_ffn_hidden_size ({cfg.moe_ffn_hidden_size}) is not divisible by "
                            f"expert_tensor_parallel_size ({etp_size})")
        if cfg.num_layers % pp_size:
            problems.append(f"model.num_layers ({cfg.num_layers}) is not divisible by "
                            f"pipeline_model_parallel_size ({pp_size})")
    if problems:
        raise ConfigError("cannot lay out the model: " + "; ".join(problems))


def stage_layers(cfg: ModelConfig, pp_rank: int, pp_size: int) -> range:
    """Global layer indices held by pipeline stage `pp_rank` (layers split evenly)."""
    check_shardable(cfg, 1, pp_size)
    if not 0 <= pp_rank < pp_size:
        raise ConfigError(f"pipeline rank {pp_rank} is outside [0, {pp_size})")
    per_stage = cfg.num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


@dataclass(frozen=True)
class LocalParam:
    """One parameter of one pipeline stage and where it comes from in the full state."""

    local_name: str
    """Name in this stage's GPTModel (local-spec form, pipeline-local layer number)."""
    full_name: str
    """Name in the full Megatron state (global layer number); the embedding for a tied output copy."""
    split: TPSplit
    """How it is divided over TP ranks."""
    tied_copy: bool = False
    """True for the last stage's copy of a tied embedding (PP > 1): load it, never export it."""

    @property
    def expert(self) -> bool:
        """An expert weight: split over the expert tensor-parallel group, not the TP group."""
        return is_expert_param(self.full_name)


def stage_params(cfg: ModelConfig, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> list[LocalParam]:
    """Every parameter of pipeline stage `pp_rank` (with the experts of EP rank `ep_rank`), in model order."""
    layers = stage_layers(cfg, pp_rank, pp_size)
    out = []
    if pp_rank == 0:
        out.append(LocalParam(EMBEDDING, EMBEDDING, TPSplit.VOCAB))
    full_suffixes = layer_param_suffixes(cfg, ep_rank, ep_size)
    local_suffixes = layer_param_suffixes(cfg, ep_rank, ep_size, local_names=True)
    for local, global_index in enumerate(layers):
        for full_suffix, local_suffix in zip(full_suffixes, local_suffixes):
            out.append(LocalParam(layer_name(local, local_suffix), layer_name(global_index, full_suffix),
                                  tp_split_of(layer_name(0, full_suffix))))
    if pp_rank == pp_size - 1:
        out.append(LocalParam(FINAL_NORM, FINAL_NORM, TPSplit.REPLICATED))
        if cfg.untie_embeddings_and_output_weights:
            out.append(LocalParam(OUTPUT_LAYER, OUTPUT_LAYER, TPSplit.VOCAB))
        elif pp_size > 1:
            out.append(LocalParam(OUTPUT_LAYER, EMBEDDING, TPSplit.VOCAB, tied_copy=True))
    return out


def split_tp(tensor: torch.Tensor, split: TPSplit, tp_size: int) -> list[torch.Tensor]:
    """Cut a full tensor into its `tp_size` shards (views where the cut is contiguous)."""
    if split is TPSplit.REPLICATED:
        return [tensor] * tp_size
    local_shape(tuple(tensor.shape), split, tp_size)  # divisibility check with a clear message
    if split is TPSplit.ROW:
        return list(torch.chunk(tensor, tp_size, dim=1))
    if split is TPSplit.GATED_COLUMN:
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in zip(torch.chunk(gate, tp_size), torch.chunk(up, tp_size))]
    return list(torch.chunk(tensor, tp_size, dim=0))


def merge_tp(shards: list[torch.Tensor], split: TPSplit) -> torch.Tensor:
    """Inverse of `split_tp` (a replicated tensor is taken from the first shard)."""
    if split is TPSplit.REPLICATED:
        return shards[0]
    if split is TPSplit.ROW:
        return torch.cat(shards, dim=1)
    if split is TPSplit.GATED_COLUMN:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)


def fit_vocab(tensor: torch.Tensor, cfg: ModelConfig, tp_size: int) -> torch.Tensor:
    """Pad (zero rows) or trim padding rows so the vocabulary has padded_vocab_size(tp_size) rows."""
    target = cfg.padded_vocab_size(tp_size)
    rows = tensor.shape[0]
    if rows < cfg.vocab_size:
        raise ConfigError(f"vocabulary tensor has {rows} rows, fewer than model.vocab_size ({cfg.vocab_size})")
    if rows == target:
        return tensor
    if rows > target:
        return tensor[:target]
    pad = tensor.new_zeros((target - rows, *tensor.shape[1:]))
    return torch.cat([tensor, pad], dim=0)


def _check_names(have: set[str], want: set[str], what: str) -> None:
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise ConfigError(f"{what} does not match the model config: missing {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                          f"{' ...' if len(unexpected) > 8 else ''}")


def shard_for_rank(full_state: Mapping[str, torch.Tensor], cfg: ModelConfig, tp_rank: int, tp_size: int,
                   pp_rank: int, pp_size: int, *, ep_rank: int = 0, ep_size: int = 1, etp_rank: int | None = None,
                   etp_size: int | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the rank at (tp_rank, pp_rank[, ep_rank, etp_rank]), named as its GPTModel names them.

    Expert weights are cut over the expert tensor-parallel group (etp_rank / etp_size, default the TP ones).
    """
    etp_rank, etp_size = (tp_rank, tp_size) if etp_size is None else (etp_rank, etp_size)
    check_shardable(cfg, tp_size, pp_size, ep_size, etp_size)
    if not 0 <= tp_rank < tp_size:
        raise ConfigError(f"tensor-parallel rank {tp_rank} is outside [0, {tp_size})")
    if etp_rank is None or not 0 <= etp_rank < etp_size:
        raise ConfigError(f"expert tensor-parallel rank {etp_rank} is outside [0, {etp_size})")
    _check_names(set(full_state), set(full_param_names(cfg)), "full Megatron state")
    out = {}
    for p in stage_params(cfg, pp_rank, pp_size, ep_rank, ep_size):
        tensor = full_state[p.full_name]
        if p.split is TPSplit.VOCAB:
            tensor = fit_vocab(tensor, cfg, tp_size)
        want = full_param_shape(p.full_name, cfg, tp_size)
        if tuple(tensor.shape) != want:
            raise ConfigError(f"{p.full_name} has shape {tuple(tensor.shape)}, the model config expects {want}")
        rank, size = (etp_rank, etp_size) if p.expert else (tp_rank, tp_size)
        out[p.local_name] = split_tp(tensor, p.split, size)[rank]
    return out


def gather_from_ranks(local_states: Mapping[tuple[int, ...], Mapping[str, torch.Tensor]], cfg: ModelConfig,
                      tp_size: int, pp_size: int, *, ep_size: int = 1,
                      etp_size: int | None = None) -> dict[str, torch.Tensor]:
    """Join every rank's state into the full Megatron state.

    Keys are (tp_rank, pp_rank), or (tp_rank, pp_rank, ep_rank, etp_rank) for an expert-parallel
    layout (every (tp, pp) and every (pp, ep, etp) must be among them; replicas may repeat).
    The vocabulary keeps the padding of this layout; a tied output copy must equal the embedding.
    """
    etp_size = tp_size if etp_size is None else etp_size
    check_shardable(cfg, tp_size, pp_size, ep_size, etp_size)
    states = {(k + (0, k[0]) if len(k) == 2 else tuple(k)): v for k, v in local_states.items()}
    by_tp = {(k[0], k[1]): k for k in states}
    by_expert = {(k[1], k[2], k[3]): k for k in states}
    want_tp = {(t, p) for t in range(tp_size) for p in range(pp_size)}
    want_expert = {(p, e, t) for p in range(pp_size) for e in range(ep_size) for t in range(etp_size)}
    if not want_tp <= set(by_tp) or not want_expert <= set(by_expert) or len(by_tp) > len(want_tp):
        raise ConfigError(f"gather_from_ranks needs the states of all (tp_rank, pp_rank) in {tp_size} x {pp_size}"
                          f" and all (pp_rank, ep_rank, etp_rank) in {pp_size} x {ep_size} x {etp_size}, got keys "
                          f"{sorted(states)}")
    full: dict[str, torch.Tensor] = {}
    tied_copy = None
    for pp_rank in range(pp_size):
        for ep_rank in range(ep_size):
            params = stage_params(cfg, pp_rank, pp_size, ep_rank, ep_size)
            for key in {by_tp[(t, pp_rank)] for t in range(tp_size)} | {by_expert[(pp_rank, ep_rank, t)]
                                                                         for t in range(etp_size)}:
                if key[2] == ep_rank:
                    _check_names(set(states[key]), {p.local_name for p in params}, f"state of rank {key}")
            for p in params:
                if p.expert:
                    keys = [by_expert[(pp_rank, ep_rank, t)] for t in range(etp_size)]
                elif ep_rank > 0:
                    continue
                else:
                    keys = [by_tp[(t, pp_rank)] for t in range(tp_size)]
                merged = merge_tp([states[k][p.local_name] for k in keys], p.split)
                if p.tied_copy:
                    tied_copy = merged
                else:
                    full[p.full_name] = merged
    if tied_copy is not None and not torch.equal(tied_copy, full[EMBEDDING]):
        raise ValueError("the last stage's tied output_layer.weight differs from the first stage's embedding: "
                         "the tied copies went out of sync")
    return full
