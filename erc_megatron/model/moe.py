"""Mixture-of-Experts settings of a ModelConfig as megatron-core TransformerConfig arguments."""
from __future__ import annotations

from typing import Any

from erc_megatron.model.config import MOE_ARCHITECTURES, ConfigError, ModelConfig


def moe_overrides(section: Any, hf_config: Any) -> dict[str, Any]:
    """ModelConfig overrides from the run config's model section (moe_* keys) for this checkpoint.

    A dense checkpoint refuses MoE settings that differ from their defaults instead of ignoring them.
    """
    defaults = {"moe_aux_loss_coeff": None, "moe_router_load_balancing_type": "aux_loss",
                "moe_token_dispatcher_type": "alltoall"}
    chosen = {k: getattr(section, k) for k in defaults}
    arch = (getattr(hf_config, "architectures", None) or [""])[0]
    if arch not in MOE_ARCHITECTURES:
        changed = sorted(k for k, v in chosen.items() if v != defaults[k])
        if changed:
            raise ConfigError(f"{', '.join('model.' + k for k in changed)} set, but the checkpoint is dense "
                              f"({arch or type(hf_config).__name__}); MoE settings need one of {MOE_ARCHITECTURES}")
        return {}
    return {k: v for k, v in chosen.items() if v is not None}


def moe_transformer_kwargs(model: ModelConfig, expert_model_parallel_size: int = 1,
                           expert_tensor_parallel_size: int = 1) -> dict[str, Any]:
    """TransformerConfig keyword arguments for the model's experts ({} for a dense model)."""
    if not model.is_moe:
        return {}
    return dict(
        num_moe_experts=model.num_moe_experts,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_router_topk=model.moe_router_topk,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        # Qwen3-MoE routes by softmax scores without a bias or a scaling factor
        moe_router_score_function="softmax",
        moe_router_topk_scaling_factor=None,
        moe_router_enable_expert_bias=False,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_router_load_balancing_type=model.moe_router_load_balancing_type,
        moe_token_dispatcher_type=model.moe_token_dispatcher_type,
        moe_grouped_gemm=False,
        # HF computes router probabilities in float32 whatever the model dtype
        moe_router_dtype="fp32",
        moe_permute_fusion=False,
        # dropless, as HF: every token reaches all its top-k experts
        moe_expert_capacity_factor=None,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )


__all__ = ["moe_overrides", "moe_transformer_kwargs"]
