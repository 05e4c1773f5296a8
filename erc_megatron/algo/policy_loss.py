"""Policy-gradient loss with Entropy Ratio Clipping (ERC), as one pure function.

Per response token: base surrogate (PPO/DAPO clip-higher, GPPO, CISPO or GSPO) -> dual-clip for
A < 0 -> truncated importance sampling against the rollout engine -> ERC gate (a token whose
entropy ratio leaves the band keeps its loss VALUE but gets no gradient) -> optional entropy
bonus. The per-token losses are then aggregated over a GLOBAL denominator: the caller computes
`aggregation_denominator` for every micro-batch of every data-parallel (and context-parallel) rank,
sums it once per mini-batch, and passes the total to every call, so the summed contributions equal
the loss of the whole mini-batch however it is split.

The exact contract (values and gradients) is the project's algorithms spec (spec/algorithms.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping

import torch

from erc_megatron.algo.surrogates import LOG_RATIO_CLAMP, resolve_surrogate
from erc_megatron.model.config import ConfigError

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
ERC_EPS = 1e-8


@dataclass
class PolicyLossConfig:
    """How the per-token policy loss is built and aggregated."""

    surrogate: str = "ppo_clip"
    """Base surrogate: ppo_clip (PPO/DAPO clip-higher), gppo (gradient-preserving clip), cispo, gspo, a name
    given to algo.surrogates.register_surrogate, or a 'package.module:function' path (algo/surrogates.py)."""
    eps_low: float = 0.2
    """The ratio is clipped below at 1 - eps_low (ppo_clip, gppo, cispo); in [0, 1)."""
    eps_high: float = 0.28
    """The ratio is clipped above at 1 + eps_high (ppo_clip, gppo, cispo); DAPO's clip-higher 0.28."""
    clip_ratio_c: float = 3.0
    """Dual-clip bound for A < 0, l = min(-A*c, l) (ppo_clip, gppo, gspo); > 1, or 0 to disable."""
    gppo_beta1: float = 1.0
    """GPPO: gradient scale of the clipped low branch (r < 1 - eps_low, A < 0); >= 0."""
    gppo_beta2: float = 1.0
    """GPPO: gradient scale of the clipped high branch (r > 1 + eps_high, A > 0); >= 0."""
    gspo_eps_low: float = 3e-4
    """GSPO: the sequence ratio is clipped below at 1 - gspo_eps_low; in [0, 1)."""
    gspo_eps_high: float = 4e-4
    """GSPO: the sequence ratio is clipped above at 1 + gspo_eps_high; >= 0."""
    erc: bool = False
    """Entropy Ratio Clipping: tokens with rho = H / H_old outside (erc_low, erc_high) get no gradient."""
    erc_low: float = 0.8
    """ERC lower band edge (exclusive); 0 < erc_low < 1. The paper's recipes use 0.95."""
    erc_high: float = 1.2
    """ERC upper band edge (exclusive); erc_high > 1. The paper's recipes use 1.05."""
    agg: str = "token-mean"
    """Aggregation: token-mean, seq-mean-token-mean or seq-mean-token-sum (all over the global batch)."""
    tis_cap: float = 0.0
    """Truncated IS weight min(exp(old_logp - rollout_logp), tis_cap) on every token; 0 disables."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss gets -entropy_coef * H aggregated like the policy term; >= 0."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        resolve_surrogate(self.surrogate, f"{name}.surrogate")
        if self.agg not in AGGREGATIONS:
            raise ConfigError(f"{name}.agg must be one of {AGGREGATIONS}, got {self.agg!r}")
        for field_name in ("eps_low", "gspo_eps_low"):
            v = getattr(self, field_name)
            if not 0 <= v < 1:
                raise ConfigError(f"{name}.{field_name} must be in [0, 1), got {v}")
        for field_name in ("eps_high", "gspo_eps_high", "gppo_beta1", "gppo_beta2", "tis_cap", "entropy_coef"):
            v = getattr(self, field_name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name}.{field_name} must be a finite number >= 0, got {v}")
        if not (self.clip_ratio_c == 0 or (math.isfinite(self.clip_ratio_c) and self.clip_ratio_c > 1)):
            raise ConfigError(f"{name}.clip_ratio_c must be > 1 (or 0 to disable dual-clip), got {self.clip_ratio_c}")
        # checked even with erc off: a config that would be wrong when ERC is switched on is wrong now
        if not 0 < self.erc_low < 1:
            raise ConfigError(f"{name}.erc_low must be in (0, 1) (0 < erc_low < 1 < erc_high), got {self.erc_low}")
        if not (math.isfinite(self.erc_high) and self.erc_high > 1):
            raise ConfigError(f"{name}.erc_high must be > 1 (0 < erc_low < 1 < erc_high), got {self.erc_high}")

    @property
    def dual_clip(self) -> bool:
        """Whether dual-clip applies (CISPO's weight is already bounded, so never there)."""
        return self.clip_ratio_c > 0 and self.surrogate != "cispo"


# How each metric returned by `policy_loss` combines across micro-batches and ranks.
METRIC_REDUCTIONS: dict[str, str] = {
    "tokens": "sum",  # response tokens (mask > 0)
    "seqs": "sum",  # sequences with at least one response token
    "loss": "sum",  # this call's contribution to the mini-batch loss (already over the global denominator)
    "pg_loss_sum": "sum",  # sum of per-token policy losses (after TIS, before aggregation)
    "ppo_clipped": "sum",  # tokens where the clipped branch is active (clipped > unclipped); cispo: weight truncated
    "dual_clipped": "sum",  # tokens with A < 0 where the dual-clip bound is active
    "kl_sum": "sum",  # sum of (old_logp - logp), approx KL
    "ratio_sum": "sum",
    "ratio_max": "max",
    "ratio_min": "min",
    "tis_weight_sum": "sum",  # 1 per token when TIS is off
    "tis_truncated": "sum",  # tokens whose IS weight hit tis_cap
    "entropy_tokens": "sum",  # tokens with H given
    "entropy_sum": "sum",
    "erc_tokens": "sum",  # tokens with both H and H_old given
    "old_entropy_sum": "sum",
    "erc_in_band": "sum",  # low < rho < high
    "erc_low": "sum",  # rho <= low
    "erc_high": "sum",  # rho >= high
    "rho_sum": "sum",
    "rho_min": "min",
    "rho_max": "max",
}


def _nan_div(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _finite_or_nan(v: float) -> float:
    return v if math.isfinite(v) else float("nan")


def finalize_metrics(totals: Mapping[str, float]) -> dict[str, float]:
    """Global step metrics from the reduced METRIC_REDUCTIONS totals (token-weighted means)."""
    tokens = totals["tokens"]
    erc_tokens = totals["erc_tokens"]
    return {
        "pg/tokens": tokens,
        "pg/seqs": totals["seqs"],
        "pg/loss": totals["loss"],
        "pg/loss_token_mean": _nan_div(totals["pg_loss_sum"], tokens),
        "pg/clip_frac": _nan_div(totals["ppo_clipped"], tokens),
        "pg/dual_clip_frac": _nan_div(totals["dual_clipped"], tokens),
        "pg/approx_kl": _nan_div(totals["kl_sum"], tokens),
        "pg/ratio_mean": _nan_div(totals["ratio_sum"], tokens),
        "pg/ratio_max": _finite_or_nan(totals["ratio_max"]),
        "pg/ratio_min": _finite_or_nan(totals["ratio_min"]),
        "tis/weight_mean": _nan_div(totals["tis_weight_sum"], tokens),
        "tis/truncated_frac": _nan_div(totals["tis_truncated"], tokens),
        "entropy/mean": _nan_div(totals["entropy_sum"], totals["entropy_tokens"]),
        "entropy/old_mean": _nan_div(totals["old_entropy_sum"], erc_tokens),
        "erc/in_band_frac": _nan_div(totals["erc_in_band"], erc_tokens),
        "erc/low_frac": _nan_div(totals["erc_low"], erc_tokens),
        "erc/high_frac": _nan_div(totals["erc_high"], erc_tokens),
        "erc/rho_mean": _nan_div(totals["rho_sum"], erc_tokens),
        "erc/rho_min": _finite_or_nan(totals["rho_min"]),
        "erc/rho_max": _finite_or_nan(totals["rho_max"]),
    }


def aggregation_denominator(response_mask: torch.Tensor, agg: str) -> torch.Tensor:
    """This micro-batch's share of the global denominator (float64 count, 0-dim).

    token-mean: response tokens; seq-mean-*: sequences (rows of a [B, T] mask) with at least one
    response token, so that padding rows added to even out micro-batch shapes never count. Sum it
    over every micro-batch and data-parallel rank of the mini-batch before the schedule runs. With
    context parallelism pass the masks BEFORE the sequence split (a split sequence would be
    counted once per context-parallel rank otherwise).
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    mask = response_mask > 0
    if agg == "token-mean":
        return mask.sum(dtype=torch.float64)
    if mask.dim() != 2:
        raise ValueError(f"agg={agg!r} needs a [batch, tokens] response_mask, got shape {tuple(mask.shape)}")
    return mask.any(dim=-1).sum(dtype=torch.float64)


def _check_shapes(ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} (the shape of log_prob)")


def _as_denominator(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # a count; below 1 only when there is nothing to divide (numerator 0), so 0/1 = 0 instead of NaN
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).clamp(min=1.0)


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, mask_f: torch.Tensor, agg: str,
               global_denominator: float | torch.Tensor | None, seq_token_counts: torch.Tensor | None) -> torch.Tensor:
    contrib = torch.where(mask, per_token, 0.0)
    if agg == "token-mean":
        n = mask_f.sum() if global_denominator is None else global_denominator
        return contrib.sum() / _as_denominator(n, contrib)
    per_seq = contrib.sum(-1)
    if agg == "seq-mean-token-mean":
        counts = mask_f.sum(-1) if seq_token_counts is None else seq_token_counts.to(contrib.dtype)
        per_seq = per_seq / counts.clamp(min=1.0)
    n = mask.any(-1).sum() if global_denominator is None else global_denominator
    return per_seq.sum() / _as_denominator(n, contrib)


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    old_entropy: torch.Tensor | None = None,
    config: PolicyLossConfig | None = None,
    rollout_log_prob: torch.Tensor | None = None,
    global_denominator: float | torch.Tensor | None = None,
    seq_token_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Aggregated policy loss (to minimise) and this call's local metrics.

    All per-token inputs share one shape whose last dim is tokens ([batch, tokens] for the
    seq-mean aggregations and GSPO); `advantages` is already broadcast to tokens and
    `response_mask` is 0/1 (bool or float). Only `log_prob` (and `entropy` when
    entropy_coef > 0) should carry gradient; the others are used detached.

    global_denominator: the mini-batch total of `aggregation_denominator` over all micro-batches
        and ranks; None uses this call's own (the loss is then a plain local mean).
    seq_token_counts: [batch] response tokens of each WHOLE sequence, for seq-mean-token-mean when
        context parallelism hands this call only part of each sequence; None counts the mask's
        rows. GSPO refuses it: its sequence ratio needs the whole sequence's log-ratios.

    Metrics are detached 0-dim float64 tensors over the masked tokens, keyed as METRIC_REDUCTIONS
    (the same keys on every call, so they reduce across ranks); `finalize_metrics` turns their
    global totals into fractions and means.
    """
    cfg = config if config is not None else PolicyLossConfig()
    _check_shapes(log_prob, old_log_prob=old_log_prob, advantages=advantages, response_mask=response_mask,
                  entropy=entropy, old_entropy=old_entropy, rollout_log_prob=rollout_log_prob)
    if (cfg.agg != "token-mean" or cfg.surrogate == "gspo") and log_prob.dim() != 2:
        raise ValueError(f"agg={cfg.agg!r} / surrogate={cfg.surrogate!r} need [batch, tokens] inputs, "
                         f"got shape {tuple(log_prob.shape)}")
    if seq_token_counts is not None and tuple(seq_token_counts.shape) != tuple(log_prob.shape[:1]):
        raise ValueError(f"seq_token_counts has shape {tuple(seq_token_counts.shape)}, "
                         f"expected {tuple(log_prob.shape[:1])}")
    if seq_token_counts is not None and cfg.surrogate == "gspo":
        raise ValueError("surrogate='gspo' needs whole sequences on one rank; seq_token_counts (a context-parallel "
                         "split) is not supported")
    if cfg.erc and (entropy is None or old_entropy is None):
        raise ValueError("PolicyLossConfig.erc=True needs both entropy and old_entropy (per-token H and H_old)")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(f"PolicyLossConfig.entropy_coef={cfg.entropy_coef} needs entropy (per-token H)")
    if cfg.tis_cap > 0 and rollout_log_prob is None:
        raise ValueError(f"PolicyLossConfig.tis_cap={cfg.tis_cap} needs rollout_log_prob "
                         "(the rollout engine's own log-probs)")

    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    mask = response_mask > 0
    mask_f = mask.to(dtype)

    def clean(t: torch.Tensor, detach: bool = True) -> torch.Tensor:
        # whatever sits under the mask (padding, -inf log-probs) must not turn into NaN gradients
        return torch.where(mask, (t.detach() if detach else t).to(dtype), 0.0)

    def clean_optional(t: torch.Tensor | None, detach: bool = True) -> torch.Tensor | None:
        return None if t is None else clean(t, detach)

    log_prob = clean(log_prob, detach=False)
    old_log_prob = clean(old_log_prob)
    adv = clean(advantages)
    rollout_log_prob = clean_optional(rollout_log_prob)
    old_entropy = clean_optional(old_entropy)
    entropy = clean_optional(entropy, detach=False)

    loss_tok, clipped = resolve_surrogate(cfg.surrogate)(cfg, log_prob, old_log_prob, adv, mask)
    pg_before_dual = loss_tok
    if cfg.dual_clip:
        loss_tok = torch.where(adv < 0, torch.minimum(-adv * cfg.clip_ratio_c, loss_tok), loss_tok)
    tis_weight = raw = None
    if cfg.tis_cap > 0:
        assert rollout_log_prob is not None  # checked above
        raw = torch.exp(torch.clamp(old_log_prob - rollout_log_prob, max=LOG_RATIO_CLAMP))
        tis_weight = torch.clamp(raw, max=cfg.tis_cap)
        loss_tok = loss_tok * tis_weight
    rho = None
    if entropy is not None and old_entropy is not None:
        # a gate only: no gradient ever flows through H or H_old here
        rho = (entropy.detach() + ERC_EPS) / (old_entropy + ERC_EPS)
    in_band = None
    if rho is not None:
        in_band = (rho > cfg.erc_low) & (rho < cfg.erc_high)
    if cfg.erc:
        assert in_band is not None  # erc needs entropy and old_entropy, checked above
        loss_tok = torch.where(in_band, loss_tok, loss_tok.detach())

    total_tok = loss_tok
    if cfg.entropy_coef > 0:
        assert entropy is not None  # checked above
        total_tok = loss_tok - cfg.entropy_coef * entropy
    loss = _aggregate(total_tok, mask, mask_f, cfg.agg, global_denominator, seq_token_counts)

    with torch.no_grad():
        metrics = _metrics(log_prob, old_log_prob, adv, mask, loss, loss_tok, pg_before_dual, clipped, cfg,
                           tis_weight, raw, entropy, old_entropy, rho, in_band)
    return loss, metrics


T = torch.Tensor


def _metrics(log_prob: T, old_log_prob: T, adv: T, mask: T, loss: T, loss_tok: T, pg_before_dual: T, clipped: T,
             cfg: PolicyLossConfig, tis_weight: T | None, tis_raw: T | None, entropy: T | None,
             old_entropy: T | None, rho: T | None, in_band: T | None) -> dict[str, T]:
    f64 = torch.float64

    def msum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x.to(f64), 0.0).sum()

    def mcount(b: torch.Tensor) -> torch.Tensor:
        return (mask & b).sum(dtype=f64)

    def mmax(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x.to(f64), -math.inf).amax() if x.numel() else x.new_tensor(-math.inf, dtype=f64)

    def mmin(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x.to(f64), math.inf).amin() if x.numel() else x.new_tensor(math.inf, dtype=f64)

    def zero() -> torch.Tensor:
        return torch.zeros((), dtype=f64, device=log_prob.device)

    tokens = mask.sum(dtype=f64)
    rows = mask.reshape(-1, mask.shape[-1]) if mask.dim() else mask.reshape(1, 1)
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if cfg.dual_clip:
        dual = mcount((adv < 0) & (pg_before_dual > -adv * cfg.clip_ratio_c))
    else:
        dual = zero()
    out = {
        "tokens": tokens,
        "seqs": rows.any(-1).sum(dtype=f64),
        "loss": loss.detach().to(f64),
        "pg_loss_sum": msum(loss_tok),
        "ppo_clipped": mcount(clipped),
        "dual_clipped": dual,
        "kl_sum": msum(old_log_prob - log_prob),
        "ratio_sum": msum(ratio),
        "ratio_max": mmax(ratio),
        "ratio_min": mmin(ratio),
        "tis_weight_sum": msum(tis_weight) if tis_weight is not None else tokens.clone(),
        "tis_truncated": mcount(tis_raw > cfg.tis_cap) if tis_raw is not None else zero(),
        "entropy_tokens": tokens.clone() if entropy is not None else zero(),
        "entropy_sum": msum(entropy) if entropy is not None else zero(),
    }
    if rho is not None:
        assert old_entropy is not None and in_band is not None  # they come with rho
        out.update(erc_tokens=tokens.clone(), old_entropy_sum=msum(old_entropy), erc_in_band=mcount(in_band),
                   erc_low=mcount(rho <= cfg.erc_low), erc_high=mcount(rho >= cfg.erc_high), rho_sum=msum(rho),
                   rho_min=mmin(rho), rho_max=mmax(rho))
    else:
        out.update(erc_tokens=zero(), old_entropy_sum=zero(), erc_in_band=zero(), erc_low=zero(), erc_high=zero(),
                   rho_sum=zero(), rho_min=zero() + math.inf, rho_max=zero() - math.inf)
    return {k: v.detach() for k, v in out.items()}
