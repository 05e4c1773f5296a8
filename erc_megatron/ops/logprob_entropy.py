"""Token log-probability and full-vocabulary entropy from vocabulary-parallel logits.

One all-gather of per-row statistics in forward, no collective in backward, one chunked pass over
the logits each way, the logits never modified. See `vocab_parallel_stats` for the math.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .vocab_parallel_stats import (
    VocabShard,
    all_gather_stats,
    check_common,
    chunk_stats,
    compute_dtype,
    default_chunk_rows,
    grad_coefficients,
    grad_logits_chunk,
    local_target,
    merge_stats,
    resolve_shard,
)


def vocab_parallel_logprob_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    entropy_grad: bool = False,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy) per row of vocabulary-parallel logits; see `erc_megatron.ops`.

    Args:
        logits: this rank's vocabulary shard `[..., V/tp]`; rank r of `tp_group` holds global ids
            [r * V/tp, (r + 1) * V/tp). Every rank must pass the same shard size and the same rows.
        target: global token ids `[...]` (integer dtype), in [0, vocab_size).
        tp_group: tensor-parallel group the vocabulary is split over; None = no split, no
            communication (NOT the default group).
        temperature: logits are divided by it first (> 0).
        chunk_size: rows per chunk (bounds the work memory to two [chunk_size, V/tp] buffers of the
            compute dtype); None = an internal cache-sized chunk. Results do not depend on it.
        entropy_grad: whether a gradient flows into the entropy; when False it is returned
            detached and nothing is kept for it.
        vocab_size: real global vocabulary size; ids >= vocab_size are padding and ignored
            (their gradient is exactly 0). None = no padding.

    Returns:
        `logp`, `entropy`, each shaped like `target`, float32 (float64 for float64 logits).
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point or logits.dim() < 1:
        raise TypeError("logits: expected a floating-point tensor [..., V/tp]")
    if not isinstance(target, torch.Tensor) or tuple(logits.shape[:-1]) != tuple(target.shape):
        raise ValueError(f"target: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), "
                         f"got {tuple(getattr(target, 'shape', ()))}")
    shard = resolve_shard(logits.shape[-1], tp_group, vocab_size)
    check_common(target, temperature, chunk_size,
                 shard.local_size * shard.tp_size if vocab_size is None else vocab_size)
    logp, entropy = _LogprobEntropy.apply(logits, target, tp_group, shard, 1.0 / float(temperature), chunk_size,
                                          bool(entropy_grad))
    return logp, entropy


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, tp_group: dist.ProcessGroup | None,
                shard: VocabShard, inv_t: float, chunk_size: int | None,
                entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cdtype = compute_dtype(logits.dtype)
        x = logits.reshape(-1, shard.local_size)[:, : shard.valid]
        rows, width = x.shape
        chunk = chunk_size or default_chunk_rows(width)
        idx, here = local_target(target, shard)

        stats = torch.empty((4, rows), dtype=cdtype, device=logits.device)
        c = min(chunk, rows)
        dbuf = torch.empty((c, width), dtype=cdtype, device=logits.device)
        ebuf = torch.empty_like(dbuf)
        for i in range(0, rows, chunk):
            j = min(i + chunk, rows)
            chunk_stats(x[i:j], inv_t, idx[i:j], here[i:j], dbuf[: j - i], ebuf[: j - i], stats[:, i:j])
        del dbuf, ebuf
        res = merge_stats(all_gather_stats(stats, shard, tp_group), inv_t, out_dtype=cdtype)
        logp, entropy = res.logp.view(target.shape), res.entropy.view(target.shape)

        saved = [logits, target, res.lse_raw]
        if entropy_grad:
            saved.append(res.mean_raw)
        else:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(*saved)
        ctx.shard, ctx.inv_t, ctx.chunk, ctx.entropy_grad = shard, inv_t, chunk, entropy_grad
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logp: torch.Tensor,
                 grad_entropy: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        logits, target, lse_raw, *rest = ctx.saved_tensors
        shard, inv_t, chunk = ctx.shard, ctx.inv_t, ctx.chunk
        cdtype = compute_dtype(logits.dtype)
        idx, here = local_target(target, shard)
        lse_hi, a, b, mean_hi, onehot = grad_coefficients(
            grad_logp, grad_entropy if ctx.entropy_grad else None, lse_raw, rest[0] if ctx.entropy_grad else None,
            here, inv_t, cdtype)

        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        g2 = grad.view(-1, shard.local_size)
        if shard.valid < shard.local_size:
            g2[:, shard.valid:].zero_()
        x = logits.reshape(-1, shard.local_size)[:, : shard.valid]
        rows, width = x.shape
        direct = grad.dtype == cdtype  # write straight into the gradient, else via a float32 chunk
        c = min(chunk, rows)
        obuf = None if direct else torch.empty((c, width), dtype=cdtype, device=logits.device)
        tmp = torch.empty((c, width), dtype=cdtype, device=logits.device) if b is not None else None
        for i in range(0, rows, chunk):
            j = min(i + chunk, rows)
            out = g2[i:j, : shard.valid] if obuf is None else obuf[: j - i]
            grad_logits_chunk(x[i:j], inv_t, lse_hi[i:j], a[i:j], None if b is None else b[i:j],
                              None if mean_hi is None else mean_hi[i:j], onehot[i:j], idx[i:j], out,
                              None if tmp is None else tmp[: j - i])
            if not direct:
                g2[i:j, : shard.valid].copy_(out)
        return grad, None, None, None, None, None, None
