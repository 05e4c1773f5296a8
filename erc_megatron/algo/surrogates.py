"""Base surrogate losses by name, and user surrogates by import path.

A surrogate is a pure function

    fn(cfg, log_prob, old_log_prob, advantages, mask) -> (per_token_loss, clipped)

on tensors of one shape (last dim tokens; `mask` bool): `per_token_loss` is the loss to minimise
before dual-clip, truncated IS, ERC and aggregation (policy_loss applies those to every surrogate),
`clipped` a bool tensor marking the tokens whose clip branch is active (logged as pg/clipfrac).
`cfg` is the PolicyLossConfig, so a surrogate may read eps_low / eps_high and the other fields.
`loss.surrogate` names a built-in (SURROGATES) or a `package.module:function` path.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from erc_megatron.utils.import_path import is_import_path, load_callable

if TYPE_CHECKING:
    from erc_megatron.algo.policy_loss import PolicyLossConfig

SurrogateFn = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]
# exp(20) ~ 5e8: far outside any clip band, yet finite in fp32 and its square too
LOG_RATIO_CLAMP = 20.0


def _ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    return torch.exp(torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _clip_max(adv: torch.Tensor, ratio: torch.Tensor, low_bound: float | torch.Tensor,
              high_bound: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    unclipped = -adv * ratio
    # floats, or tensors for GPPO: torch's overloads of clamp take one kind or the other
    clipped = -adv * torch.clamp(ratio, low_bound, high_bound)  # type: ignore[arg-type]
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_clip(cfg: PolicyLossConfig, log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor,
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO / DAPO clip-higher: max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))."""
    return _clip_max(adv, _ratio(log_prob, old_log_prob), 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)


def gppo(cfg: PolicyLossConfig, log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor,
         mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPPO: the clip bounds keep their value but carry a beta-scaled gradient."""
    ratio = _ratio(log_prob, old_log_prob)
    # value exactly 1, gradient grad(logp)
    carrier = ratio / ratio.detach() - 1.0
    low_bound = (1.0 - cfg.eps_low) * (1.0 + cfg.gppo_beta1 * carrier)
    high_bound = (1.0 + cfg.eps_high) * (1.0 + cfg.gppo_beta2 * carrier)
    return _clip_max(adv, ratio, low_bound, high_bound)


def cispo(cfg: PolicyLossConfig, log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor,
          mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO: -A * sg(clip(r)) * logp, so every token keeps a gradient."""
    ratio = _ratio(log_prob, old_log_prob)
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    weight = torch.clamp(ratio, lo, hi).detach()
    return -adv * weight * log_prob, (ratio < lo) | (ratio > hi)


def gspo(cfg: PolicyLossConfig, log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor,
         mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO: the length-normalised sequence ratio, clipped, on every token of the sequence."""
    lo, hi = 1.0 - cfg.gspo_eps_low, 1.0 + cfg.gspo_eps_high
    seq_log_ratio = torch.where(mask, log_prob - old_log_prob, 0.0).sum(-1) / mask.sum(-1).clamp(min=1.0)
    seq_log_ratio = torch.clamp(seq_log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).detach()
    # value s_i on every token of sequence i, gradient s_i * grad(logp_t)
    ratio = torch.exp(log_prob - log_prob.detach() + seq_log_ratio.unsqueeze(-1))
    return _clip_max(adv, ratio, lo, hi)


SURROGATES: dict[str, SurrogateFn] = {"ppo_clip": ppo_clip, "gppo": gppo, "cispo": cispo, "gspo": gspo}


def register_surrogate(name: str, fn: SurrogateFn) -> None:
    """Make `fn` selectable as `loss.surrogate: <name>`; a built-in name cannot be taken."""
    if name in SURROGATES and SURROGATES[name] is not fn:
        raise ValueError(f"surrogate {name!r} is already registered ({SURROGATES[name].__module__})")
    if is_import_path(name):
        raise ValueError(f"surrogate name {name!r} must not contain ':' or '.' (those are import paths)")
    SURROGATES[name] = fn


@functools.cache
def _load(path: str, what: str) -> SurrogateFn:
    return load_callable(path, what)


def resolve_surrogate(name: str, what: str = "loss.surrogate") -> SurrogateFn:
    """The surrogate registered as `name`, or imported from a `package.module:function` path."""
    if name in SURROGATES:
        return SURROGATES[name]
    if is_import_path(name):
        return _load(name, what)
    from erc_megatron.model.config import ConfigError

    raise ConfigError(f"{what} must be one of {tuple(SURROGATES)} or a 'package.module:function' path, "
                      f"got {name!r}")
