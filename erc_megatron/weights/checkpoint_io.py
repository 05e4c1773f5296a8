"""Hugging Face safetensors checkpoints <-> a TP x PP megatron-core GPTModel.

- `load_hf_checkpoint`: each rank reads only the slices of the tensors its shard needs
  (safetensors `safe_open` / `get_slice`), so no rank ever holds the full model.
- `iter_hf_weights` (from `hf_stream`): collective stream of HF buckets, for weight sync.
- `save_hf_checkpoint`: collective; global rank 0 writes `model[-0000k-of-0000n].safetensors`
  (+ index), `config.json` and tokenizer files, loadable by transformers' `from_pretrained`.

Load before the optimizer is built, or call `optimizer.reload_model_params()` after loading:
megatron's bf16/fp16 optimizer keeps its own fp32 copy of the parameters, which a load does not reach.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from contextlib import ExitStack
from typing import Any

import torch
import torch.distributed as dist

from erc_megatron.model.config import ConfigError, ModelConfig
from erc_megatron.model.gpt import torch_dtype

from .hf_convert import HF_EMBEDDING, HF_LM_HEAD, check_hf_compatible, check_hf_names, hf_shape, \
    megatron_shard_from_hf
from .hf_stream import is_bucket_receiver, iter_hf_weights, plan_hf_buckets
from .rank_params import rank_groups, rank_parameters

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                "Qwen3MoeForCausalLM": "qwen3_moe"}


class HFCheckpointReader:
    """Reads tensors, or slices of them, by name from a safetensors checkpoint directory."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX_FILE)
        single_path = os.path.join(hf_dir, SINGLE_FILE)
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        if os.path.exists(index_path):
            with open(index_path) as f:
                self.weight_map: dict[str, str] = dict(json.load(f)["weight_map"])
        elif os.path.exists(single_path):
            self.weight_map = {name: SINGLE_FILE for name in self._handle(SINGLE_FILE).keys()}
        else:
            raise FileNotFoundError(f"{hf_dir} has neither {INDEX_FILE} nor {SINGLE_FILE} "
                                    f"(only safetensors checkpoints are supported)")

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def _handle(self, filename: str):
        if filename not in self._handles:
            from safetensors import safe_open

            self._handles[filename] = self._stack.enter_context(
                safe_open(os.path.join(self.hf_dir, filename), framework="pt", device="cpu"))
        return self._handles[filename]

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{self.hf_dir} has no tensor {name!r}")
        return self._handle(self.weight_map[name]).get_slice(name)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or its slice [start, stop) along dim (dim 0 or 1)."""
        sl = self._slice(name)
        if dim is None:
            return sl[:]
        stop = sl.get_shape()[dim] if stop is None else stop
        if dim == 0:
            return sl[start:stop]
        if dim == 1:
            return sl[:, start:stop]
        raise ValueError(f"slicing along dim {dim} is not supported")


@torch.no_grad()
def load_hf_checkpoint(model, hf_dir: str, model_cfg: ModelConfig, *, layout=None) -> None:
    """Fill this rank's GPTModel shard from a HF safetensors checkpoint (single file or sharded).

    `layout`: erc_megatron.dist.ParallelLayout (None: the one init_distributed made)."""
    check_hf_compatible(model_cfg)
    g = rank_groups(layout)
    units, params = rank_parameters(model, model_cfg, g.pp_rank, g.pp_size, g.ep_rank, g.ep_size)
    with HFCheckpointReader(hf_dir) as reader:
        names = reader.names()
        check_hf_names(names, model_cfg, f"checkpoint {hf_dir}")
        alias = {HF_EMBEDDING: HF_LM_HEAD} if HF_EMBEDDING not in names else {}
        checked: set[str] = set()

        def fetch(name: str, dim: int | None, start: int, stop: int | None) -> torch.Tensor:
            source = alias.get(name, name)
            if source not in checked:
                if reader.shape(source) != hf_shape(name, model_cfg):
                    raise ConfigError(f"{source} in {hf_dir} has shape {reader.shape(source)}, the model config "
                                      f"expects {hf_shape(name, model_cfg)}")
                checked.add(source)
            return reader.read(source, dim, start, stop)

        for u in units:
            shard = megatron_shard_from_hf(u.full_name, model_cfg, fetch, *g.split_rank(u.expert))
            param = params[u.local_name]
            if tuple(shard.shape) != tuple(param.shape):
                raise ConfigError(f"{u.local_name}: shard from the checkpoint has shape {tuple(shard.shape)}, "
                                  f"the model's parameter {tuple(param.shape)}")
            param.data.copy_(shard.to(dtype=param.dtype, device=param.device))


def hf_config_to_model_config(hf_config_or_dir, **overrides: Any) -> ModelConfig:
    """ModelConfig from a transformers config (or a checkpoint directory), refusing what it cannot model."""
    hf = hf_config_or_dir
    if isinstance(hf, (str, os.PathLike)):
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(os.fspath(hf))
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise ConfigError(f"rope_type {rope_type!r} (RoPE scaling) is not supported; only 'default'")
    if getattr(hf, "mlp_bias", False):
        raise ConfigError("mlp_bias=True is not supported (Megatron is built with add_bias_linear=False)")
    cfg = ModelConfig.from_hf_config(hf, **overrides)
    check_hf_compatible(cfg)
    return cfg


def model_config_to_hf_config(cfg: ModelConfig):
    """A transformers config for this ModelConfig (Llama / Qwen2 / Qwen3)."""
    from transformers import AutoConfig

    check_hf_compatible(cfg)
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.rotary_base, hidden_act="silu",
        tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
    )
    if cfg.hf_architecture != "Qwen2ForCausalLM":
        kwargs["attention_bias"] = False
    if cfg.is_moe:
        kwargs.update(num_experts=cfg.num_moe_experts, moe_intermediate_size=cfg.moe_ffn_hidden_size,
                      num_experts_per_tok=cfg.moe_router_topk, norm_topk_prob=not cfg.moe_router_pre_softmax,
                      router_aux_loss_coef=cfg.moe_aux_loss_coeff, decoder_sparse_step=1, mlp_only_layers=[])
    hf = AutoConfig.for_model(_MODEL_TYPES[cfg.hf_architecture], **kwargs)
    hf.architectures = [cfg.hf_architecture]
    hf.dtype = cfg.params_dtype
    return hf


def _check_same_model(hf_config, cfg: ModelConfig) -> None:
    theirs = ModelConfig.from_hf_config(hf_config)
    fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "vocab_size", "add_qkv_bias", "qk_layernorm", "untie_embeddings_and_output_weights",
              "hf_architecture", "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax")
    diff = [f"{f}: {getattr(theirs, f)} vs {getattr(cfg, f)}" for f in fields if getattr(theirs, f) != getattr(cfg, f)]
    if diff:
        raise ConfigError("hf_config does not describe this model: " + "; ".join(diff))


def save_hf_checkpoint(model, model_cfg: ModelConfig, out_dir: str, tokenizer_dir: str | None = None, *,
                       hf_config=None, max_shard_bytes: int = 4 << 30, dtype: torch.dtype | None = None,
                       layout=None) -> None:
    """Write a HF checkpoint of the model to out_dir (collective; the first stage's leader, global rank 0, writes).

    hf_config: the original transformers config to write (checked against model_cfg); default one
    built from model_cfg. tokenizer_dir: copy tokenizer / generation config files from there.
    layout: erc_megatron.dist.ParallelLayout (None: the one init_distributed made).
    """
    from safetensors.torch import save_file

    if hf_config is not None:
        _check_same_model(hf_config, model_cfg)
    plan = plan_hf_buckets(model_cfg, rank_groups(layout).pp_size, max_shard_bytes, dtype)
    total = sum(len(stage) for stage in plan)
    writer = is_bucket_receiver("rank0", layout)
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for i, bucket in enumerate(iter_hf_weights(model, model_cfg, max_shard_bytes, dtype=dtype,
                                               destination="rank0", layout=layout)):
        filename = SINGLE_FILE if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        # clones: safetensors refuses tensors that share storage (views of one received buffer)
        tensors = {name: t.detach().to("cpu", copy=True) for name, t in bucket}
        save_file(tensors, os.path.join(out_dir, filename), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = filename
            total_bytes += t.numel() * t.element_size()
    if writer:
        if total > 1:
            with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                          f, indent=2)
        config = copy.deepcopy(hf_config) if hf_config is not None else model_config_to_hf_config(model_cfg)
        config.dtype = str(dtype or torch_dtype(model_cfg.params_dtype)).removeprefix("torch.")
        config.save_pretrained(out_dir)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, name)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(out_dir, name))
    if dist.is_initialized():
        dist.barrier()


__all__ = ["HFCheckpointReader", "hf_config_to_model_config", "iter_hf_weights", "load_hf_checkpoint",
           "model_config_to_hf_config", "save_hf_checkpoint"]
