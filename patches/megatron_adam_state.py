"""Adam's per-parameter moments inside a megatron-core optimizer, keyed by the MODEL's parameters.

A resharded resume cuts the moments like the weights they belong to, so it needs them per model
parameter. megatron-core keeps them in the wrapped torch optimizer's `state`, keyed by the
parameter the torch optimizer steps: the model parameter itself (fp32 params), or its fp32 copy
`param.main_param` (bf16/fp16 params, Float16OptimizerWithFloat16Params). Checked against
megatron-core 0.16.1: `get_megatron_optimizer` returns a ChainedOptimizer whose
`chained_optimizers` each wrap a torch optimizer as `.optimizer`; verified at every call.
"""
from __future__ import annotations

import torch

from .source_rewrite import UpstreamChangedError

CHECKED = "megatron-core 0.16.1"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    out = []
    for opt in chained:
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            raise UpstreamChangedError(f"{type(opt).__name__} no longer wraps a torch optimizer as `.optimizer`; "
                                       f"the Adam state access must be re-checked (written for {CHECKED})")
        out.append(inner)
    return out


def _owner(optimizer, model_param) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    main = getattr(model_param, "main_param", model_param)
    for opt in _torch_optimizers(optimizer):
        if any(p is main for group in opt.param_groups for p in group["params"]):
            return opt, main
    raise UpstreamChangedError(f"a model parameter of shape {tuple(model_param.shape)} is stepped by no wrapped "
                               f"torch optimizer (neither it nor its .main_param); re-check for {CHECKED}")


def adam_step_count(optimizer, model_params) -> int:
    """Optimizer steps taken so far (0 before the first); the same for every parameter."""
    for p in model_params:
        opt, main = _owner(optimizer, p)
        state = opt.state.get(main)
        if state and "step" in state:
            return int(state["step"])
    return 0


def adam_moment(optimizer, model_param, name: str) -> torch.Tensor:
    """The moment `name` (exp_avg or exp_avg_sq) of `model_param`; created as zeros if the optimizer has
    not stepped yet, so a loader can fill it in place."""
    if name not in MOMENTS:
        raise ValueError(f"moment must be one of {MOMENTS}, got {name!r}")
    opt, main = _owner(optimizer, model_param)
    state = opt.state[main]
    if name not in state:
        state[name] = torch.zeros_like(main, memory_format=torch.preserve_format)
    if state[name].shape != main.shape:
        raise UpstreamChangedError(f"{name} has shape {tuple(state[name].shape)}, its parameter "
                                   f"{tuple(main.shape)}; re-check for {CHECKED}")
    return state[name]


def set_adam_step_count(optimizer, model_params, step: int) -> None:
    """Set every parameter's step count (torch Adam keeps it per parameter, as a float tensor)."""
    for p in model_params:
        opt, main = _owner(optimizer, p)
        opt.state[main]["step"] = torch.tensor(float(step), dtype=torch.float32)


def main_params(model_params) -> dict:
    """{model parameter: its fp32 master copy} for the bf16/fp16 parameters (none for fp32 models)."""
    return {p: p.main_param for p in model_params if getattr(p, "main_param", None) is not None}
