"""Independent float64 references for the algo tests: plain per-token Python loops.

Each token's loss value and its analytic derivatives d/dlogp and d/dH are written out from the
algorithms spec case by case (not by autograd through the same expressions the code uses), then
weighted by the aggregation and summed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


@dataclass
class TokenRef:
    value: float  # per-token policy loss after dual-clip, TIS (ERC never changes the value)
    d_logp: float  # d value / d logp after the ERC gate
    clipped: bool  # clipped branch active (cispo: weight truncated)
    dual: bool  # dual-clip active
    ratio: float


def token_refs(cfg, logp, old, adv, mask, ent=None, old_ent=None, rollout=None) -> list[list[TokenRef | None]]:
    """Per-token references for [B, T] float64 tensors (None where the mask is 0)."""
    B, T = logp.shape
    lp, ol, A, m = logp.tolist(), old.tolist(), adv.tolist(), mask.tolist()
    H = ent.tolist() if ent is not None else None
    Ho = old_ent.tolist() if old_ent is not None else None
    ro = rollout.tolist() if rollout is not None else None
    out: list[list[TokenRef | None]] = []
    for i in range(B):
        row: list[TokenRef | None] = []
        n_i = sum(1 for t in range(T) if m[i][t] > 0)
        seq_lr = sum(lp[i][t] - ol[i][t] for t in range(T) if m[i][t] > 0) / max(n_i, 1)
        s_i = math.exp(_clip(seq_lr, -20.0, 20.0))
        for t in range(T):
            if not m[i][t] > 0:
                row.append(None)
                continue
            a = A[i][t]
            x = lp[i][t] - ol[i][t]
            r = math.exp(_clip(x, -20.0, 20.0))
            dr = r if -20.0 < x < 20.0 else 0.0  # d r / d logp
            lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
            if cfg.surrogate == "cispo":
                w = _clip(r, lo, hi)
                value, d = -a * w * lp[i][t], -a * w
                clipped = r < lo or r > hi
            else:
                if cfg.surrogate == "gspo":
                    lo, hi = 1 - cfg.gspo_eps_low, 1 + cfg.gspo_eps_high
                    q, dq = s_i, s_i  # token-level form: value s_i, gradient s_i * grad(logp_t)
                else:
                    q, dq = r, dr
                unclipped, clipped_v = -a * q, -a * _clip(q, lo, hi)
                clipped = clipped_v > unclipped
                if clipped:
                    value = clipped_v
                    if cfg.surrogate == "gppo":
                        beta, bound = (cfg.gppo_beta1, lo) if q < lo else (cfg.gppo_beta2, hi)
                        d = -a * beta * bound * (dq / q)
                    else:
                        d = 0.0
                else:
                    value, d = unclipped, -a * dq
            dual = False
            if cfg.surrogate != "cispo" and cfg.clip_ratio_c > 0 and a < 0 and value > -a * cfg.clip_ratio_c:
                value, d, dual = -a * cfg.clip_ratio_c, 0.0, True
            if cfg.tis_cap > 0:
                wt = min(math.exp(ol[i][t] - ro[i][t]), cfg.tis_cap)
                value, d = value * wt, d * wt
            if cfg.erc:
                rho = (H[i][t] + 1e-8) / (Ho[i][t] + 1e-8)
                if not (cfg.erc_low < rho < cfg.erc_high):
                    d = 0.0
            row.append(TokenRef(value, d, clipped, dual, r))
        out.append(row)
    return out


def agg_weights(agg: str, mask: torch.Tensor, n_global: float | None = None,
                seq_counts: list[float] | None = None) -> list[list[float]]:
    """Weight of each token in the aggregated loss."""
    m = mask.tolist()
    B, T = len(m), len(m[0]) if m else 0
    n_tok = [sum(1 for t in range(T) if m[i][t] > 0) for i in range(B)]
    if agg == "token-mean":
        n = n_global if n_global is not None else sum(n_tok)
        return [[1.0 / max(n, 1) if m[i][t] > 0 else 0.0 for t in range(T)] for i in range(B)]
    n_seq = n_global if n_global is not None else sum(1 for c in n_tok if c > 0)
    w = []
    for i in range(B):
        per_tok = 1.0 / max(seq_counts[i] if seq_counts else n_tok[i], 1) if agg == "seq-mean-token-mean" else 1.0
        w.append([per_tok / max(n_seq, 1) if m[i][t] > 0 else 0.0 for t in range(T)])
    return w


def reference_loss(cfg, logp, old, adv, mask, ent=None, old_ent=None, rollout=None):
    """(loss, d loss / d logp [B, T], d loss / d H [B, T]) in float64."""
    refs = token_refs(cfg, logp, old, adv, mask, ent, old_ent, rollout)
    w = agg_weights(cfg.agg, mask)
    B, T = logp.shape
    H = ent.tolist() if ent is not None else None
    loss = 0.0
    g_lp = torch.zeros(B, T, dtype=torch.float64)
    g_h = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        for t in range(T):
            ref = refs[i][t]
            if ref is None:
                continue
            value = ref.value - (cfg.entropy_coef * H[i][t] if cfg.entropy_coef > 0 else 0.0)
            loss += w[i][t] * value
            g_lp[i, t] = w[i][t] * ref.d_logp
            g_h[i, t] = -w[i][t] * cfg.entropy_coef
    return loss, g_lp, g_h


F64 = torch.float64


def make_batch(seed: int, B: int = 5, T: int = 7, dtype=F64) -> dict:
    """Random [B, T] inputs with both clip sides, dual-clip candidates, ERC in/out of band and an empty row."""
    g = torch.Generator().manual_seed(seed)
    logp = -(torch.rand(B, T, generator=g, dtype=F64) * 2 + 0.05)
    old = logp + torch.randn(B, T, generator=g, dtype=F64) * 0.35
    per_seq = [1.3, -0.9, -1.7, 0.6, 0.4, -0.5, 1.1, -1.2]
    adv = torch.tensor([per_seq[i % len(per_seq)] for i in range(B)], dtype=F64).unsqueeze(-1).repeat(1, T)
    adv[3] = torch.randn(T, generator=g, dtype=F64)  # per-token advantages are allowed too
    old[1, 2] = logp[1, 2] - 1.4  # r ~ 4 > clip_ratio_c with A < 0: dual-clip
    old[2, 0] = logp[2, 0] - 1.7
    old[0, 3] = logp[0, 3] + 1.0  # r ~ 0.37, far below the band
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    mask[1, 2] = mask[2, 0] = mask[0, 3] = True
    if B >= 5:
        mask[4] = False  # a padding row: no response tokens
    old_ent = torch.rand(B, T, generator=g, dtype=F64) * 1.5 + 0.1
    ent = old_ent * torch.exp(torch.randn(B, T, generator=g, dtype=F64) * 0.25)
    rollout = old + torch.randn(B, T, generator=g, dtype=F64) * 0.3
    out = dict(logp=logp, old=old, adv=adv, mask=mask, ent=ent, old_ent=old_ent, rollout=rollout)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()}
