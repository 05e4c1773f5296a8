"""Output projection fused with log-prob and entropy: the [T, V/tp] logits never exist in full.

Rows are processed in chunks: logits_chunk = hidden_chunk @ weight[:valid].T in the compute dtype
(float32, float64 for float64 inputs), per-row statistics as in `vocab_parallel_stats`, one
all-gather for all rows. Backward recomputes each logits chunk, forms its gradient in place and
feeds it straight into grad_hidden (chunk @ weight) and grad_weight (chunk^T @ hidden); the
hidden-state gradient is then summed over the tensor-parallel group in ONE all-reduce, because each
rank only holds its vocabulary shard's contribution. grad_weight stays local.

Backends: only "torch" (chunked torch ops, any device) exists. A GPU kernel registers itself in
`_BACKENDS` under its own name with the same signature as `_torch_backend`.
"""
from __future__ import annotations

from collections.abc import Callable
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
    grad_coefficients,
    grad_logits_chunk,
    local_target,
    merge_stats,
    resolve_shard,
)

DEFAULT_CHUNK_ROWS = 1024


def fused_linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_ROWS,
    entropy_grad: bool = False,
    vocab_size: int | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy) of `hidden @ weight.T` without materialising the logits.

    Args:
        hidden: `[..., h]`, the same on every rank of `tp_group` (the output layer's input). Its
            gradient is returned already summed over `tp_group`: do not also pass it through
            megatron's `copy_to_tensor_model_parallel_region`, which would all-reduce it again.
        weight: this rank's vocabulary shard of the output layer `[V/tp, h]` (same layout as
            megatron's vocab-parallel output layer: rank r holds ids [r*V/tp, (r+1)*V/tp)).
        target, tp_group, temperature, entropy_grad, vocab_size: as in
            `vocab_parallel_logprob_entropy`.
        chunk_size: rows per chunk (None = 1024); work memory is about two [chunk_size, V/tp] buffers of the
            compute dtype (plus a float32 copy of the weight for bf16/fp16 inputs).
        backend: implementation; "torch" is the only one for now.

    Returns:
        `logp`, `entropy` shaped like `target`, float32 (float64 for float64 inputs).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {sorted(_BACKENDS)}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight: expected [V/tp, h] with h = hidden.shape[-1] = "
                         f"{hidden.shape[-1] if hidden.dim() else '?'}, got {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden/weight: dtypes must match, got {hidden.dtype} and {weight.dtype}")
    if not isinstance(target, torch.Tensor) or tuple(hidden.shape[:-1]) != tuple(target.shape):
        raise ValueError(f"target: expected shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), "
                         f"got {tuple(getattr(target, 'shape', ()))}")
    shard = resolve_shard(weight.shape[0], tp_group, vocab_size)
    check_common(target, temperature, chunk_size,
                 shard.local_size * shard.tp_size if vocab_size is None else vocab_size)
    logp, entropy = _BACKENDS[backend](hidden, weight, target, tp_group, shard, 1.0 / float(temperature),
                                       chunk_size or DEFAULT_CHUNK_ROWS, bool(entropy_grad))
    return logp, entropy


def _torch_backend(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                   tp_group: dist.ProcessGroup | None, shard: VocabShard, inv_t: float, chunk_size: int,
                   entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logp, entropy = _FusedLinearLogprobEntropy.apply(hidden, weight, target, tp_group, shard, inv_t, chunk_size,
                                                     entropy_grad)
    return logp, entropy


_BACKENDS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"torch": _torch_backend}


def _compute_weight(weight: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The real rows of the weight in the compute dtype (a copy only for bf16 / fp16)."""
    return weight[: shard.valid].to(compute_dtype(weight.dtype))


class _FusedLinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                tp_group: dist.ProcessGroup | None, shard: VocabShard, inv_t: float, chunk: int,
                entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cdtype = compute_dtype(hidden.dtype)
        h = hidden.reshape(-1, hidden.shape[-1])
        rows = h.shape[0]
        w = _compute_weight(weight, shard)
        idx, here = local_target(target, shard)

        stats = torch.empty((4, rows), dtype=cdtype, device=hidden.device)
        c = min(chunk, rows)
        lbuf = torch.empty((c, shard.valid), dtype=cdtype, device=hidden.device)
        ebuf = torch.empty_like(lbuf)
        for i in range(0, rows, chunk):
            j = min(i + chunk, rows)
            logits = torch.mm(h[i:j].to(cdtype), w.T, out=lbuf[: j - i])
            chunk_stats(logits, inv_t, idx[i:j], here[i:j], None, ebuf[: j - i], stats[:, i:j], x_is_scratch=True)
        del lbuf, ebuf, w
        res = merge_stats(all_gather_stats(stats, shard, tp_group), inv_t, out_dtype=cdtype)
        logp, entropy = res.logp.view(target.shape), res.entropy.view(target.shape)

        saved = [hidden, weight, target, res.lse_raw]
        if entropy_grad:
            saved.append(res.mean_raw)
        else:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(*saved)
        ctx.tp_group, ctx.shard, ctx.inv_t, ctx.chunk, ctx.entropy_grad = tp_group, shard, inv_t, chunk, entropy_grad
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logp: torch.Tensor,
                 grad_entropy: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, target, lse_raw, *rest = ctx.saved_tensors
        shard, inv_t, chunk = ctx.shard, ctx.inv_t, ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdtype = compute_dtype(hidden.dtype)
        h = hidden.reshape(-1, hidden.shape[-1])
        rows = h.shape[0]
        w = _compute_weight(weight, shard)
        idx, here = local_target(target, shard)
        lse_hi, a, b, mean_hi, onehot = grad_coefficients(
            grad_logp, grad_entropy if ctx.entropy_grad else None, lse_raw, rest[0] if ctx.entropy_grad else None,
            here, inv_t, cdtype)

        grad_h = torch.empty((rows, h.shape[1]), dtype=cdtype, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=cdtype, device=weight.device) if need_w else None
        c = min(chunk, rows)
        lbuf = torch.empty((c, shard.valid), dtype=cdtype, device=h.device)
        gbuf = torch.empty_like(lbuf)
        for i in range(0, rows, chunk):
            j = min(i + chunk, rows)
            hc = h[i:j].to(cdtype)
            logits = torch.mm(hc, w.T, out=lbuf[: j - i])
            g = gbuf[: j - i]
            grad_logits_chunk(logits, inv_t, lse_hi[i:j], a[i:j], None if b is None else b[i:j],
                              None if mean_hi is None else mean_hi[i:j], onehot[i:j], idx[i:j], g, None,
                              x_is_scratch=True)
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[i:j])
            if grad_w is not None:
                grad_w[: shard.valid].addmm_(g.T, hc)
        del lbuf, gbuf
        if grad_h is not None:
            # reduced in hidden's dtype, as megatron's output layer does: same traffic as the unfused path
            grad_h = grad_h.to(hidden.dtype)
            if shard.tp_size > 1:
                dist.all_reduce(grad_h, group=ctx.tp_group)  # each rank holds only its shard's part
        return (None if grad_h is None else grad_h.view(hidden.shape),
                None if grad_w is None else grad_w.to(weight.dtype),
                None, None, None, None, None, None)
