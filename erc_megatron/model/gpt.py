"""Build a megatron-core GPTModel shard for a Llama / Qwen2 / Qwen3-style dense or Qwen3-MoE-style model."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from erc_megatron.model.config import ModelConfig

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def build_transformer_config(model: ModelConfig, tensor_model_parallel_size: int = 1,
                             pipeline_model_parallel_size: int = 1, context_parallel_size: int = 1, *,
                             expert_model_parallel_size: int = 1, expert_tensor_parallel_size: int | None = None,
                             sequence_parallel: bool = False):
    from megatron.core.transformer import TransformerConfig

    from erc_megatron.model.moe import moe_transformer_kwargs

    dtype = torch_dtype(model.params_dtype)
    on_gpu = torch.cuda.is_available()
    if sequence_parallel and not have_transformer_engine():
        # the local spec's torch norms refuse sequence parallelism; Transformer Engine's do not
        from erc_megatron.patches.megatron_torch_norm_sp import apply_torch_norm_sequence_parallel

        apply_torch_norm_sequence_parallel()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        sequence_parallel=sequence_parallel,
        recompute_granularity=model.recompute_granularity,
        recompute_method=model.recompute_method,
        recompute_num_layers=model.recompute_num_layers,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # p2p sync calls torch.cuda.synchronize(); not needed with batched isend/irecv on gloo
        batch_p2p_sync=on_gpu,
        deallocate_pipeline_outputs=on_gpu,
        **moe_transformer_kwargs(model, expert_model_parallel_size,
                                 expert_tensor_parallel_size or tensor_model_parallel_size),
    )


def layer_spec(model: ModelConfig):
    from megatron.core.models.gpt import gpt_layer_specs

    moe = dict(num_experts=model.num_moe_experts, moe_grouped_gemm=False) if model.is_moe else {}
    if have_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm, **moe)
    if model.is_moe:
        from erc_megatron.patches.megatron_moe_cpu import apply_moe_cpu_patches

        apply_moe_cpu_patches()
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization="RMSNorm", **moe)


def build_gpt_model(model: ModelConfig, transformer_config=None, pre_process: bool | None = None,
                    post_process: bool | None = None, *, layout=None, sequence_parallel: bool = False):
    """This rank's GPTModel shard at `layout` (erc_megatron.dist.ParallelLayout; None: the one
    erc_megatron.dist.init_distributed made)."""
    from megatron.core.models.gpt import GPTModel

    from erc_megatron.dist import current_layout

    layout = layout or current_layout()
    tp = layout.tp.size
    if transformer_config is None:
        transformer_config = build_transformer_config(model, tp, layout.pp.size, layout.cp.size,
                                                      expert_model_parallel_size=layout.ep.size,
                                                      expert_tensor_parallel_size=layout.etp.size,
                                                      sequence_parallel=sequence_parallel)
    if pre_process is None:
        pre_process = layout.is_first_stage
    if post_process is None:
        post_process = layout.is_last_stage
    gpt = GPTModel(
        config=transformer_config,
        transformer_layer_spec=layer_spec(model),
        vocab_size=model.padded_vocab_size(tp),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base) if float(model.rotary_base).is_integer() else model.rotary_base,
    )
    if not torch.cuda.is_available():
        return gpt
    return gpt.cuda(torch.cuda.current_device())
