"""Adam's per-parameter moments and fp32 master weights inside a megatron-core optimizer, keyed by the
MODEL's parameters, with or without the distributed optimizer.

A resharded resume cuts the moments like the weights they belong to, so it needs them per model
parameter, whole. megatron-core keeps them in the wrapped torch optimizer's `state`, keyed by the
tensor the torch optimizer steps:
- plain optimizer: the model parameter itself (fp32 params), or its fp32 copy `param.main_param`
  (bf16/fp16 params, Float16OptimizerWithFloat16Params);
- DistributedOptimizer (ZeRO-1): a flat slice of the parameter, the part this data-parallel rank
  owns (`_get_model_param_range_map(param)["param"]`, a range into `param.view(-1)`); the slice is
  a view of the model parameter (fp32) or an fp32 shard copy (bf16/fp16; `param.main_param` is then
  None and `param.main_param_sharded` True). `model_param_group_index_map[param]` says where the
  slice sits in the torch optimizer's param_groups. A rank owning none of a parameter has no entry.
Whole tensors of a distributed optimizer are assembled by summing zero-filled full tensors holding
each rank's slice over the optimizer's `data_parallel_group` (the slices are disjoint, so the sum
is exact), in chunks of at most CHUNK_ELEMENTS.

Checked against megatron-core 0.16.1 and 0.19.2 (both run here): `get_megatron_optimizer` returns a
ChainedOptimizer whose `chained_optimizers` each wrap a torch optimizer as `.optimizer`; DistributedOptimizer has
`model_param_group_index_map`, `_get_model_param_range_map`, `buffers` (each with `param_index_map`
of every parameter it holds) and `data_parallel_group`; verified at every call.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .source_rewrite import UpstreamChangedError

CHECKED = "megatron-core 0.16.1 and 0.19.2 (both run on CPU)"
MOMENTS = ("exp_avg", "exp_avg_sq")
CHUNK_ELEMENTS = 1 << 26  # 256 MiB of fp32 per all-reduce when assembling whole tensors
_DISTOPT_ATTRS = ("model_param_group_index_map", "_get_model_param_range_map", "buffers", "data_parallel_group")


def _chained(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    out = []
    for opt in _chained(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            raise UpstreamChangedError(f"{type(opt).__name__} no longer wraps a torch optimizer as `.optimizer`; "
                                       f"the Adam state access must be re-checked (written for {CHECKED})")
        out.append(inner)
    return out


def _distributed_optimizers(optimizer) -> list:
    found = [opt for opt in _chained(optimizer) if type(opt).__name__ == "DistributedOptimizer"]
    for opt in found:
        missing = [a for a in _DISTOPT_ATTRS if not hasattr(opt, a)]
        if missing:
            raise UpstreamChangedError(f"DistributedOptimizer has no {missing}; the sharded Adam state access must be "
                                       f"re-checked (written for {CHECKED})")
    return found


def is_distributed(optimizer) -> bool:
    """Whether the optimizer (or one of a chain) is megatron's DistributedOptimizer."""
    return bool(_distributed_optimizers(optimizer))


# --- the plain optimizer: whole tensors live in the state ---------------------------------------

def _owner(optimizer, model_param) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    main = getattr(model_param, "main_param", model_param)
    for opt in _torch_optimizers(optimizer):
        if any(p is main for group in opt.param_groups for p in group["params"]):
            return opt, main
    raise UpstreamChangedError(f"a model parameter of shape {tuple(model_param.shape)} is stepped by no wrapped "
                               f"torch optimizer (neither it nor its .main_param); re-check for {CHECKED}")


def _plain_moment(optimizer, model_param, name: str) -> torch.Tensor:
    opt, main = _owner(optimizer, model_param)
    state = opt.state[main]
    if name not in state:
        state[name] = torch.zeros_like(main, memory_format=torch.preserve_format)
    if state[name].shape != main.shape:
        raise UpstreamChangedError(f"{name} has shape {tuple(state[name].shape)}, its parameter "
                                   f"{tuple(main.shape)}; re-check for {CHECKED}")
    return state[name]


# --- the distributed optimizer: this rank's slice of each parameter -----------------------------

def _slice(optimizer, model_param):
    """(distributed optimizer holding the parameter, the tensor it steps or None, start, end)."""
    for opt in _distributed_optimizers(optimizer):
        if not any(model_param in buffer.param_index_map for buffer in opt.buffers):
            continue
        if model_param not in opt.model_param_group_index_map:
            return opt, None, 0, 0  # another data-parallel rank owns all of it
        group_index, order = opt.model_param_group_index_map[model_param]
        main = opt.optimizer.param_groups[group_index]["params"][order]
        rng = opt._get_model_param_range_map(model_param)["param"]
        if main.numel() != rng.end - rng.start:
            raise UpstreamChangedError(f"the distributed optimizer's slice has {main.numel()} elements, its range "
                                       f"[{rng.start}, {rng.end}); re-check for {CHECKED}")
        return opt, main, rng.start, rng.end
    raise UpstreamChangedError(f"a model parameter of shape {tuple(model_param.shape)} is in no buffer of the "
                               f"distributed optimizer; re-check for {CHECKED}")


def _slice_state(opt, main: torch.Tensor, name: str) -> torch.Tensor:
    state = opt.optimizer.state[main]
    if name not in state:
        state[name] = torch.zeros_like(main, memory_format=torch.preserve_format)
    return state[name]


def _assemble(optimizer, model_params, name: str) -> dict:
    """Whole fp32 tensors from every rank's slices (`name`: a moment, or "param" for the master weights).
    Collective over the distributed optimizer's data-parallel group."""
    by_group: dict[int, tuple] = {}
    for p in model_params:
        opt, main, start, end = _slice(optimizer, p)
        by_group.setdefault(id(opt.data_parallel_group), (opt.data_parallel_group, []))[1].append(
            (p, opt, main, start, end))
    out = {}
    for group, entries in by_group.values():
        chunk: list = []
        size = 0
        for entry in entries + [None]:
            if entry is not None and (not chunk or size + entry[0].numel() <= CHUNK_ELEMENTS):
                chunk.append(entry)
                size += entry[0].numel()
                continue
            flat = torch.zeros(size, dtype=torch.float32)
            offset = 0
            for p, opt, main, start, end in chunk:
                if main is not None:
                    source = main if name == "param" else _slice_state(opt, main, name)
                    flat[offset + start:offset + end] = source.detach().float()
                offset += p.numel()
            dist.all_reduce(flat, group=group)
            offset = 0
            for p, *_ in chunk:
                out[p] = flat[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
            if entry is not None:
                chunk, size = [entry], entry[0].numel()
    return out


def _scatter(optimizer, model_params, name: str, tensors: dict) -> None:
    for p in model_params:
        opt, main, start, end = _slice(optimizer, p)
        if main is None:
            continue
        target = main if name == "param" else _slice_state(opt, main, name)
        with torch.no_grad():
            target.copy_(tensors[p].reshape(-1)[start:end].to(target.dtype))


# --- the interface the checkpoint uses ----------------------------------------------------------

def adam_step_count(optimizer, model_params) -> int:
    """Optimizer steps taken so far (0 before the first); the same for every parameter."""
    for p in model_params:
        if is_distributed(optimizer):
            opt, main, _, _ = _slice(optimizer, p)
            state = opt.optimizer.state.get(main) if main is not None else None
        else:
            opt, main = _owner(optimizer, p)
            state = opt.state.get(main)
        if state and "step" in state:
            return int(state["step"])
    return 0


def set_adam_step_count(optimizer, model_params, step: int) -> None:
    """Set every parameter's step count (torch Adam keeps it per parameter, as a float tensor)."""
    for p in model_params:
        if is_distributed(optimizer):
            opt, main, _, _ = _slice(optimizer, p)
            if main is not None:
                opt.optimizer.state[main]["step"] = torch.tensor(float(step), dtype=torch.float32)
        else:
            opt, main = _owner(optimizer, p)
            opt.state[main]["step"] = torch.tensor(float(step), dtype=torch.float32)


def adam_moments(optimizer, model_params, name: str, for_loading: bool = False) -> dict:
    """{model parameter: its whole moment `name`} (exp_avg or exp_avg_sq), shaped like the parameter.

    Plain optimizer: the state tensors themselves (created as zeros before the first step), so a
    loader may fill them in place. Distributed optimizer: whole tensors assembled from every rank's
    slice (collective over data parallel), or with `for_loading` fresh zeros (no collective); write
    them back with `store_adam_moments`.
    """
    if name not in MOMENTS:
        raise ValueError(f"moment must be one of {MOMENTS}, got {name!r}")
    if not is_distributed(optimizer):
        return {p: _plain_moment(optimizer, p, name) for p in model_params}
    if for_loading:
        return {p: torch.zeros(p.shape, dtype=torch.float32) for p in model_params}
    return _assemble(optimizer, model_params, name)


def store_adam_moments(optimizer, model_params, name: str, tensors: dict) -> None:
    """Write whole moments back (each rank keeps its slice); a no-op for the plain optimizer's own tensors."""
    if name not in MOMENTS:
        raise ValueError(f"moment must be one of {MOMENTS}, got {name!r}")
    if is_distributed(optimizer):
        _scatter(optimizer, model_params, name, tensors)
        return
    for p in model_params:
        state = _plain_moment(optimizer, p, name)
        if tensors[p] is not state:
            with torch.no_grad():
                state.copy_(tensors[p])


def _half_params(model_params) -> list:
    return [p for p in model_params if p.dtype in (torch.bfloat16, torch.float16)]


def main_params(optimizer, model_params, for_loading: bool = False) -> dict:
    """{model parameter: its whole fp32 master copy} for the bf16/fp16 parameters (none for fp32 models).

    Plain optimizer: `param.main_param` itself. Distributed optimizer: assembled from the slices
    (collective), or with `for_loading` fresh zeros; write back with `store_main_params`.
    """
    half = _half_params(model_params)
    if not half:
        return {}
    if not is_distributed(optimizer):
        missing = [tuple(p.shape) for p in half if getattr(p, "main_param", None) is None]
        if missing:
            raise UpstreamChangedError(f"bf16/fp16 parameters of shapes {missing[:3]} have no .main_param; "
                                       f"re-check for {CHECKED}")
        return {p: p.main_param for p in half}
    if for_loading:
        return {p: torch.zeros(p.shape, dtype=torch.float32) for p in half}
    return _assemble(optimizer, half, "param")


def store_main_params(optimizer, tensors: dict) -> None:
    """Write whole fp32 master weights back (each rank keeps its slice)."""
    if is_distributed(optimizer):
        _scatter(optimizer, list(tensors), "param", tensors)
        return
    for p, t in tensors.items():
        if t is not p.main_param:
            with torch.no_grad():
                p.main_param.copy_(t)


def distributed_slices(optimizer, model_params) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's slices of the distributed optimizer ({index in model_params: {param, exp_avg,
    exp_avg_sq, step}}), for its own per-rank checkpoint file; empty for the plain optimizer."""
    if not is_distributed(optimizer):
        return {}
    out = {}
    for i, p in enumerate(model_params):
        opt, main, _, _ = _slice(optimizer, p)
        if main is None:
            continue
        state = opt.optimizer.state.get(main, {})
        out[str(i)] = {"param": main.detach().clone(), **{k: v.detach().clone() for k, v in state.items()}}
    return out


def load_distributed_slices(optimizer, model_params, slices: dict) -> None:
    """Restore what `distributed_slices` saved, on the same layout (bit-exact)."""
    for i, p in enumerate(model_params):
        opt, main, _, _ = _slice(optimizer, p)
        if main is None:
            if str(i) in slices:
                raise ValueError(f"parameter {i} has a saved slice but this rank owns none of it: not the layout "
                                 f"the checkpoint was saved with")
            continue
        saved = slices.get(str(i))
        if saved is None or saved["param"].shape != main.shape:
            raise ValueError(f"parameter {i}: the checkpoint's distributed-optimizer slice does not match this rank's "
                             f"({None if saved is None else tuple(saved['param'].shape)} vs {tuple(main.shape)})")
        with torch.no_grad():
            main.copy_(saved["param"])
        state = opt.optimizer.state[main]
        for k, v in saved.items():
            if k != "param":
                state[k] = v.clone()
