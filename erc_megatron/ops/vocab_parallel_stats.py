"""Per-row softmax statistics of a vocabulary shard, merged across tensor-parallel ranks in ONE collective.

Shared by `logprob_entropy` and `fused_linear_logprob_entropy`. With x the raw logits of the real
(unpadded) entries of this rank's shard, z = x / T, each rank computes per row

    mx = max x,   d = (x - mx) / T,   s = sum exp(d),   w = sum exp(d) d,   xt = x[target] (0 if not here)

and all-gathers the packed [4, rows] block. Every rank then merges like an online softmax, in
float64 (a few numbers per row, nothing next to the vocabulary pass): with m_r = mx_r / T,
M = max_r m_r, S = sum_r s_r e^(m_r - M), W = sum_r e^(m_r - M) (w_r + s_r (m_r - M)), giving
logsumexp(z) = M + log S, E_p[z] = M + W / S, entropy = log S - W / S, log p(target) = xt / T - logsumexp.

Backward needs no collective: p = exp(z - logsumexp) is recomputed chunk by chunk from the saved
per-row logsumexp (and E_p[z] when the entropy has a gradient).

Precision: raw maxima and target logits are exact copies of inputs; d is formed as (x - mx) / T so
its rounding error scales with |d|, which is small exactly where exp(d) matters; backward subtracts
a float32 "hi" part of T*logsumexp from x and folds the float64 remainder into per-row factors.
float32 inputs therefore match a float64 reference to ~1e-7 relative.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

# Rows per internal chunk when the caller gives none: keeps the two float32 work buffers of a
# chunk (about 2 x 1 MiB) in cache, which is faster on CPU than whole-tensor passes and bounds memory.
DEFAULT_CHUNK_ELEMENTS = 1 << 18


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """Which global vocabulary ids this rank's shard holds and how many of them are real."""

    tp_rank: int
    """Rank of this process in the tensor-parallel group (0 without TP)."""
    tp_size: int
    """Size of the tensor-parallel group (1 without TP)."""
    local_size: int
    """Entries in this rank's shard (V_padded / tp)."""
    start: int
    """Global id of the shard's first entry (tp_rank * local_size)."""
    valid: int
    """Real (unpadded) entries at the start of the shard: ids >= vocab_size are padding."""


def resolve_shard(local_size: int, tp_group: dist.ProcessGroup | None, vocab_size: int | None) -> VocabShard:
    if tp_group is None:
        tp_rank, tp_size = 0, 1
    else:
        tp_rank, tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
        if tp_rank < 0:
            raise ValueError("tp_group: this process is not a member of the given process group")
    padded = local_size * tp_size
    if vocab_size is None:
        vocab_size = padded
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size!r}: expected an int in [1, {padded}] "
                         f"(shard size {local_size} x tensor-parallel size {tp_size}) or None for no padding")
    start = tp_rank * local_size
    return VocabShard(tp_rank, tp_size, local_size, start, max(0, min(local_size, vocab_size - start)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_common(target: torch.Tensor, temperature: float, chunk_size: int | None, vocab_size: int) -> None:
    """Argument checks shared by both ops (shapes are checked by the callers)."""
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target: expected an integer tensor of token ids, got dtype {target.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature={temperature!r}: expected a finite number > 0")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int (rows per chunk) or None")
    if target.numel():
        # one cheap pass over the ids (a host sync on GPU); catches silent garbage
        lo, hi = torch.aminmax(target)
        if lo.item() < 0 or hi.item() >= vocab_size:
            raise ValueError(f"target: token ids must lie in [0, {vocab_size}) (the real vocabulary), "
                             f"got min {lo.item()} max {hi.item()}")


def local_target(target: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into the shard's real entries, clamped so rows with their target elsewhere can still
    gather / scatter harmlessly, and the mask of rows whose target is in this shard)."""
    local = target.reshape(-1).long() - shard.start
    here = (local >= 0) & (local < shard.valid)
    return local.clamp_(0, max(shard.valid - 1, 0)), here


def default_chunk_rows(width: int) -> int:
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(width, 1))


def chunk_stats(x: torch.Tensor, inv_t: float, idx: torch.Tensor, here: torch.Tensor,
                dbuf: torch.Tensor | None, ebuf: torch.Tensor, out: torch.Tensor, x_is_scratch: bool = False) -> None:
    """Local stats of rows `x` [c, valid] into `out` ([4, c] view of the compute dtype).

    Rows of `out`: raw max mx = max x, s = sum exp(d), w = sum exp(d) d with d = (x - mx) / T, and
    the raw target logit x[target] (0 if the target is not in this shard). Raw values (not divided
    by T) are exact copies of inputs, so the float64 merge sees no rounding from them; d is formed
    as (x - mx) / T so its rounding error scales with |d| (tiny where exp(d) matters), not with |z|.
    `dbuf`, `ebuf` are [c, valid] work buffers; with `x_is_scratch` the caller owns `x` (fused
    linear: a logits chunk it just computed) and it is overwritten instead of using `dbuf`.
    """
    if x.shape[1] == 0:  # shard made only of padding: contributes nothing
        out[0].fill_(float("-inf"))
        out[1:].zero_()
        return
    out[3].copy_(torch.where(here, x.gather(1, idx.unsqueeze(1)).squeeze(1), 0))
    mx = x.amax(dim=1, keepdim=True).to(out.dtype)
    d = torch.sub(x, mx, out=x if x_is_scratch else dbuf)  # also upcasts bf16 / fp16 chunk by chunk
    if inv_t != 1.0:
        d.mul_(inv_t)
    torch.exp(d, out=ebuf)
    torch.sum(ebuf, dim=1, out=out[1])
    ebuf.mul_(d)  # in place on our own buffer: no [c, V] temporary
    torch.sum(ebuf, dim=1, out=out[2])
    out[0].copy_(mx.squeeze(1))


def all_gather_stats(stats: torch.Tensor, shard: VocabShard, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """[4, rows] local stats -> [tp, 4, rows] from every rank of the group (the op's one collective)."""
    if shard.tp_size == 1:
        return stats.unsqueeze(0)
    # concatenated along dim 0, the layout every backend accepts for a single-tensor all-gather
    gathered = stats.new_empty((shard.tp_size * stats.shape[0], *stats.shape[1:]))
    # looked up at call time: torch >= 2.13 names it all_gather_single and deprecates the old name
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, stats.contiguous(), group=tp_group)
    return gathered.view(shard.tp_size, *stats.shape)


@dataclasses.dataclass
class RowResults:
    """Per-row results of the merge; `lse_raw` / `mean_raw` are T * logsumexp(z) and T * E_p[z]
    (the raw-logit scale, where backward subtracts them from the logits), in float64."""

    logp: torch.Tensor
    entropy: torch.Tensor
    lse_raw: torch.Tensor
    mean_raw: torch.Tensor


def merge_stats(gathered: torch.Tensor, inv_t: float, out_dtype: torch.dtype) -> RowResults:
    """Online-softmax merge of [tp, 4, rows] stats (see module docstring and `chunk_stats`), in float64."""
    g = gathered.double()
    mx, s, w, xt = g[:, 0], g[:, 1], g[:, 2], g[:, 3]
    max_raw = mx.amax(dim=0)
    dm = (mx - max_raw) * inv_t  # m_r - M in z units, <= 0 (-inf for a shard of pure padding)
    scale = torch.exp(dm)
    big_s = (s * scale).sum(dim=0)
    # a shard of pure padding has s = w = 0: its term is 0 (not 0 * -inf)
    big_w = torch.where(s > 0, scale * (w + s * dm), 0).sum(dim=0)
    log_s = torch.log(big_s)
    spread = big_w / big_s  # E_p[z] - M
    t = 1.0 / inv_t
    return RowResults(logp=((xt.sum(dim=0) - max_raw) * inv_t - log_s).to(out_dtype),
                      entropy=(log_s - spread).to(out_dtype),
                      lse_raw=max_raw + t * log_s, mean_raw=max_raw + t * spread)


def split_hi_lo(v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """v (float64) = hi (in `dtype`) + lo (float64): hi is what gets subtracted from the logits."""
    hi = v.to(dtype)
    return hi, v - hi.double()


def grad_logits_chunk(x: torch.Tensor, inv_t: float, lse_hi: torch.Tensor, coef_a: torch.Tensor,
                      coef_b: torch.Tensor | None, mean_hi: torch.Tensor | None, onehot: torch.Tensor,
                      idx: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor | None,
                      x_is_scratch: bool = False) -> None:
    """Gradient w.r.t. the raw logits chunk `x` [c, valid] into `out` (compute dtype, [c, valid]).

    grad = exp((x - lse_hi) / T) * (a + b * (x - mean_hi)) + onehot, per-row a, b from
    `grad_coefficients` (b None: no entropy gradient, the bracket is just a).
    """
    if x.shape[1] == 0:
        return
    torch.sub(x, lse_hi.unsqueeze(1), out=out)
    if coef_b is not None:  # before `x` may be overwritten (fused path)
        assert mean_hi is not None and (x_is_scratch or tmp is not None)  # they come with coef_b
        t = torch.sub(x, mean_hi.unsqueeze(1), out=x if x_is_scratch else tmp)
        t.mul_(coef_b.unsqueeze(1)).add_(coef_a.unsqueeze(1))
    if inv_t != 1.0:
        out.mul_(inv_t)
    out.exp_()
    out.mul_(t if coef_b is not None else coef_a.unsqueeze(1))
    out.scatter_add_(1, idx.unsqueeze(1), onehot.unsqueeze(1))


def grad_coefficients(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, lse_raw: torch.Tensor,
                      mean_raw: torch.Tensor | None, here: torch.Tensor, inv_t: float, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Per-row terms for `grad_logits_chunk`: (lse_hi, a, b, mean_hi, onehot) in the compute dtype.

    With z = x / T, p = exp(z - lse), dlogp/dz = onehot - p, dH/dz = -p (z - E_p[z]):
    grad_x = onehot * g_l / T - p / T * (g_l + g_h (x - T E) / T).
    T*lse and T*E are split into hi (subtracted from x in the compute dtype, so the rounding error
    scales with |x - hi|) and a float64 lo whose effect is folded into the per-row coefficients:
    p = exp((x - lse_hi) / T) * k with k = exp(-lse_lo / T).
    """
    g_l = grad_logp.reshape(-1).to(torch.float64)
    lse_hi, lse_lo = split_hi_lo(lse_raw, dtype)
    k = torch.exp(-lse_lo * inv_t)
    if grad_entropy is None:
        a, b, mean_hi = -inv_t * k * g_l, None, None
    else:
        g_h = grad_entropy.reshape(-1).to(torch.float64)
        assert mean_raw is not None  # saved whenever the entropy gradient is wanted
        mean_hi, mean_lo = split_hi_lo(mean_raw, dtype)
        a = -inv_t * k * (g_l - g_h * inv_t * mean_lo)
        b = (-inv_t * inv_t * k * g_h).to(dtype)
    onehot = torch.where(here, inv_t * g_l, 0)
    return lse_hi, a.to(dtype), b, mean_hi, onehot.to(dtype)
