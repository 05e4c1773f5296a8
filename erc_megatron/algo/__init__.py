"""RL math as pure functions: policy losses with ERC, positive-sample NLL, advantages, step statistics."""
from erc_megatron.algo.advantages import (
    DynamicSampler,
    DynamicSamplingExhausted,
    broadcast_to_tokens,
    dynamic_sampling_filter,
    group_advantages,
    overlong_penalty,
    set_group_advantages,
)
from erc_megatron.algo.policy_loss import PolicyLossConfig, aggregation_denominator, policy_loss
from erc_megatron.algo.surrogates import SURROGATES, register_surrogate, resolve_surrogate
from erc_megatron.algo.positive_nll import positive_nll_denominator, positive_nll_loss
from erc_megatron.algo.stats import StepStats, reduce_step_metrics

__all__ = [
    "DynamicSampler",
    "DynamicSamplingExhausted",
    "PolicyLossConfig",
    "SURROGATES",
    "StepStats",
    "aggregation_denominator",
    "broadcast_to_tokens",
    "dynamic_sampling_filter",
    "group_advantages",
    "overlong_penalty",
    "policy_loss",
    "positive_nll_denominator",
    "positive_nll_loss",
    "reduce_step_metrics",
    "register_surrogate",
    "resolve_surrogate",
    "set_group_advantages",
]
