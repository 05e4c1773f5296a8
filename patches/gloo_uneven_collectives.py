"""Uneven list all-gather / reduce-scatter on gloo (megatron's MoE dispatch under EP x expert TP).

megatron-core's all-to-all token dispatcher gathers and reduce-scatters expert inputs over the
expert tensor-parallel group with per-rank row counts (`_gather_along_first_dim` /
`_reduce_scatter_along_first_dim` with split sizes): `torch.distributed.all_gather(tensor_list,
tensor)` with tensors of different sizes, and `torch.distributed.reduce_scatter(output,
input_list)` with chunks of different sizes. NCCL takes both; gloo refuses uneven all-gathers
("invalid tensor size") and has no list reduce-scatter.

On gloo, when the sizes differ, these replacements pad every rank's rows to the largest count and
run one `all_gather_into_tensor` / `reduce_scatter_tensor` (both gloo has), then drop the padding.
Every other call (even sizes, other backends) goes to the original function unchanged.

The replacements are installed as `torch.distributed.all_gather` / `reduce_scatter` (and the same
names in `distributed_c10d`), before the communication recorder (`torch_distributed_hooks`) is: the
recorder then wraps them, records each user-level call once with the bytes of the caller's
tensors, and folds the padded collective inside it into that record. Installing while the recorder
is active fails loudly (it would hide the calls from it).

Checked against torch 2.13.0 (run here: gloo refuses the uneven all-gather, takes the padded one)
and megatron-core 0.16.1 and 0.19.2 (the two call sites in tensor_parallel/mappings.py, the same in
both, reached from `MoEAlltoAllTokenDispatcher` when expert TP > 1: at TP2 x EP2 x expert TP 2,
3 uneven all-gathers and 6 uneven reduce-scatters per rank in one forward-backward of
tests/model/moe_models.py's 2-layer model, on both versions. `MoEAllGatherTokenDispatcher` gathers
over TP x EP without split sizes, so even ones: 0 calls at TP2 x EP2, run on both).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

CHECKED = "torch 2.13.0, megatron-core 0.16.1 and 0.19.2"
_MODULES = (dist, c10d)
_PARAMS = {"all_gather": ("tensor_list", "tensor", "group", "async_op"),
           "reduce_scatter": ("output", "input_list", "op", "group", "async_op")}
_installed: dict[str, object] = {}


class UpstreamChangedError(RuntimeError):
    """torch.distributed's all_gather / reduce_scatter no longer have the parameters these wrap."""


def _is_gloo(group) -> bool:
    return dist.get_backend(group) == "gloo"


def _padded_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad], dim=0)


def _all_gather_uneven(tensor_list, tensor, group):
    rows = max(t.shape[0] for t in tensor_list)
    out = tensor.new_empty((len(tensor_list) * rows, *tensor.shape[1:]))
    # looked up per call: the recorder's wrapper, when installed, folds this into the caller's record
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, _padded_rows(tensor, rows), group=group)
    for r, dst in enumerate(tensor_list):
        dst.copy_(out[r * rows: r * rows + dst.shape[0]])


def _reduce_scatter_uneven(output, input_list, op, group):
    rows = max(t.shape[0] for t in input_list)
    flat = torch.cat([_padded_rows(t, rows) for t in input_list], dim=0)
    out = output.new_empty((rows, *output.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, flat, op=op, group=group)
    output.copy_(out[: output.shape[0]])


def _make_all_gather(original):
    @functools.wraps(original)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        uneven = len({tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}) > 1
        if not uneven or not _is_gloo(group):
            return original(tensor_list, tensor, group=group, async_op=async_op)
        if async_op:
            raise NotImplementedError("uneven all_gather with async_op=True on gloo (erc_megatron.patches."
                                      "gloo_uneven_collectives pads synchronously)")
        _all_gather_uneven(tensor_list, tensor, group)
        return None

    return all_gather


def _make_reduce_scatter(original):
    @functools.wraps(original)
    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not _is_gloo(group):
            return original(output, input_list, op=op, group=group, async_op=async_op)
        if async_op:
            raise NotImplementedError("reduce_scatter with async_op=True on gloo (erc_megatron.patches."
                                      "gloo_uneven_collectives runs it synchronously)")
        # gloo has no list reduce-scatter at all: even chunks go the same padded way (no padding)
        _reduce_scatter_uneven(output, input_list, op, group)
        return None

    return reduce_scatter


def apply_gloo_uneven_collectives() -> None:
    """Install both replacements once (idempotent); call before any communication recording starts."""
    from . import torch_distributed_hooks

    if set(_installed) == set(_PARAMS):
        return
    if torch_distributed_hooks.installed():
        raise RuntimeError("apply_gloo_uneven_collectives must run before the communication recorder is "
                           "installed (it would replace the recorder's wrappers and hide these calls)")
    for name, params in _PARAMS.items():
        original = getattr(dist, name)
        got = tuple(inspect.signature(original).parameters)
        if got[: len(params)] != params:
            raise UpstreamChangedError(f"torch.distributed.{name} has parameters {got}, expected {params} first "
                                       f"(patch checked against {CHECKED})")
        if getattr(c10d, name) is not original:
            raise UpstreamChangedError(f"torch.distributed.{name} is not distributed_c10d.{name} "
                                       f"(patch checked against {CHECKED})")
        make = _make_all_gather if name == "all_gather" else _make_reduce_scatter
        replacement = make(original)
        for module in _MODULES:
            setattr(module, name, replacement)
        _installed[name] = original


__all__ = ["CHECKED", "UpstreamChangedError", "apply_gloo_uneven_collectives"]
