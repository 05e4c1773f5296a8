"""Sequence parallelism with megatron-core's torch norms (the local layer spec: CPU, or GPU without TE).

megatron-core's `WrappedTorchNorm.__new__` asserts `not config.sequence_parallel`, although a norm
is per token and runs unchanged on a sequence shard. What sequence parallelism needs from a norm is
that its weight gradients, each computed on 1/tp of the sequence, are summed over the
tensor-parallel group: `finalize_model_grads` does that for every parameter carrying
`sequence_parallel=True` (Transformer Engine's and apex's norms set that attribute themselves).
This rewrite drops the assert and sets the attribute on the returned norm's parameters.

Checked against megatron-core 0.16.1 (run here) and 0.19.2 (source, tests/run_py312.sh's venv):
`__new__` contains `assert not config.sequence_parallel, ...` and ends with
`return norm_cls(normalized_shape=hidden_size, eps=eps)`; `finalize_model_grads` sums the gradients
of parameters with `sequence_parallel` over the TP group when `config.sequence_parallel`. Any other
shape fails at start-up naming the function (see `source_rewrite`).
"""
from __future__ import annotations

import importlib
import inspect

import torch

from .source_rewrite import Rewrite, UpstreamChangedError, rewrite_function

CHECKED = "megatron-core 0.16.1 (run), 0.19.2 (source)"
_ASSERT = 'assert not config.sequence_parallel, f"sequence parallel not supported by torch LayerNorm"'
_RETURN = "return norm_cls(normalized_shape=hidden_size, eps=eps)"


def _mark_sequence_parallel(norm: torch.nn.Module, config) -> torch.nn.Module:
    for param in norm.parameters():
        param.sequence_parallel = bool(config.sequence_parallel)
    return norm


def apply_torch_norm_sequence_parallel() -> None:
    """Let WrappedTorchNorm build norms under sequence parallelism; idempotent."""
    torch_norm = importlib.import_module("megatron.core.transformer.torch_norm")
    finalize = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    if '"sequence_parallel"' not in inspect.getsource(finalize):
        raise UpstreamChangedError("megatron.core.distributed.finalize_model_grads no longer reduces the gradients "
                                   "of parameters marked `sequence_parallel`; sequence parallelism with torch norms "
                                   f"must be re-checked (patch checked against {CHECKED})")
    torch_norm._erc_mark_sequence_parallel = _mark_sequence_parallel
    rewrite_function(torch_norm.WrappedTorchNorm, "__new__", [
        Rewrite(_ASSERT, "pass"),
        Rewrite(_RETURN, "return _erc_mark_sequence_parallel(norm_cls(normalized_shape=hidden_size, eps=eps), config)"),
    ], CHECKED)
