"""Stream a TP x PP model's weights as buckets of Hugging Face (name, tensor) pairs.

This is what weight sync to SGLang and HF export consume. `iter_hf_weights` is collective: every
rank of the model runs it. Who receives buckets (`destination`):
- "stage": on each pipeline stage, tensor-parallel rank 0 of data/context-parallel replica 0
  receives its own stage's buckets. Stages run in parallel and nothing crosses stages; a weight
  sync then uses one sender per stage (one update group per stage, as slime does).
- "rank0": the stage leaders send each bucket as one flat tensor (one p2p message per bucket,
  at most one in flight) to the first stage's leader, global rank 0 in megatron's rank order,
  which yields every bucket, its own stage first: one sender, one extra hop for later stages.
Cost per stage: one collective over the TP group per gather group (consecutive parameters of up
to `bucket_bytes` in full size; replicated norms travel in no collective): on NCCL an all-gather
(its fastest collective), on gloo a gather to TP rank 0, the only rank that keeps the result
(half the bytes of an all-gather at TP2, which on CPU compete with the sync's broadcast). Other data /
context-parallel replicas hold the same weights and do nothing.

Bucket contents follow from the config alone (`plan_hf_buckets`), so every rank knows each
bucket's names, shapes and dtype before any tensor exists (a sender can announce a bucket to
SGLang while it is gathered). A bucket holds at most `bucket_bytes`, except that a single tensor
larger than that travels alone. All tensors are cast to one dtype (`dtype`, default the model's
params_dtype) before they are gathered. A bucket's tensors are views of one flat buffer (filled
by one copy per tensor, straight from the merged TP shards), which a sender sends as is; a new
buffer per bucket, so a bucket stays valid after the next optimizer step.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from erc_megatron.model.config import ConfigError, ModelConfig
from erc_megatron.model.gpt import torch_dtype

from .expert_gather import gather_layer_experts, takes_part
from .hf_convert import check_hf_compatible, hf_from_megatron, hf_names, hf_shape
from .layout import LocalParam, TPSplit, full_param_shape, merge_tp, split_layer_name, stage_params
from .rank_params import RankGroups, rank_groups, rank_parameters

DESTINATIONS = ("stage", "rank0")
Bucket = list[tuple[str, torch.Tensor]]

# all_gather_single replaces all_gather_into_tensor in new torch; same arguments
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class HFTensorSpec:
    """One HF tensor of a planned bucket."""

    name: str
    """Hugging Face name."""
    shape: tuple[int, ...]
    """Full (unpadded) shape."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def stage_hf_tensors(cfg: ModelConfig, pp_rank: int, pp_size: int) -> list[HFTensorSpec]:
    """The HF tensors pipeline stage `pp_rank` exports, in order (a tied output copy exports nothing)."""
    return [HFTensorSpec(n, hf_shape(n, cfg)) for p in stage_params(cfg, pp_rank, pp_size) if not p.tied_copy
            for n in hf_names(p.full_name)]


def pack_buckets(specs: list[HFTensorSpec], bucket_bytes: int, element_size: int) -> list[list[HFTensorSpec]]:
    """Greedy in-order packing: a bucket closes when the next tensor would push it past bucket_bytes."""
    if bucket_bytes <= 0:
        raise ConfigError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[list[HFTensorSpec]] = []
    current: list[HFTensorSpec] = []
    size = 0
    for s in specs:
        n = s.numel * element_size
        if current and size + n > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(s)
        size += n
    if current:
        buckets.append(current)
    return buckets


def plan_hf_buckets(cfg: ModelConfig, pp_size: int, bucket_bytes: int,
                    dtype: torch.dtype | None = None) -> list[list[list[HFTensorSpec]]]:
    """Per pipeline stage, the buckets `iter_hf_weights` delivers (the same on every rank)."""
    element_size = torch.empty((), dtype=dtype or torch_dtype(cfg.params_dtype)).element_size()
    return [pack_buckets(stage_hf_tensors(cfg, s, pp_size), bucket_bytes, element_size) for s in range(pp_size)]


def is_bucket_receiver(destination: str = "stage", layout=None) -> bool:
    """Whether `iter_hf_weights` yields buckets on this rank."""
    _check_destination(destination)
    g = rank_groups(layout)
    return g.dp_rank == 0 and g.tp_rank == 0 and (destination == "stage" or g.pp_rank == 0)


def iter_hf_weights(model, model_cfg: ModelConfig, bucket_bytes: int, *, dtype: torch.dtype | None = None,
                    destination: str = "stage", layout=None) -> Iterator[Bucket]:
    """Yield HF (name, tensor) buckets on the receiving ranks (see module docstring); run on all ranks.

    `layout`: erc_megatron.dist.ParallelLayout (None: the one init_distributed made)."""
    _check_destination(destination)
    check_hf_compatible(model_cfg)
    g = rank_groups(layout)
    # expert-parallel layouts: experts live on other data-parallel ranks too (see expert_gather)
    if g.dp_rank != 0 and not (g.expert_parallel and takes_part(g)):
        return
    out_dtype = dtype or torch_dtype(model_cfg.params_dtype)
    plan = plan_hf_buckets(model_cfg, g.pp_size, bucket_bytes, out_dtype)
    units, params = rank_parameters(model, model_cfg, g.pp_rank, g.pp_size, g.ep_rank, g.ep_size)
    if g.expert_parallel:
        units = stage_params(model_cfg, g.pp_rank, g.pp_size)  # every expert, by global name
    own = _stage_buckets([u for u in units if not u.tied_copy], params, model_cfg, plan[g.pp_rank], g, out_dtype,
                         bucket_bytes)
    if g.dp_rank != 0:
        for _ in own:  # runs this rank's part of the expert gathers
            pass
        return
    if destination == "stage" or g.pp_size == 1:
        yield from (bucket for bucket, _ in own)
        return
    if g.tp_rank != 0:
        for _ in own:  # runs this rank's part of the TP gathers
            pass
        return
    first = dist.get_global_rank(g.pp_group, 0)
    if g.pp_rank != 0:
        in_flight = None
        for _, flat in own:
            if in_flight is not None:
                in_flight[0].wait()
            in_flight = (dist.isend(flat, dst=first, group=g.pp_group), flat)
        if in_flight is not None:
            in_flight[0].wait()
        return
    yield from (bucket for bucket, _ in own)
    device = next(iter(params.values())).device
    for stage in range(1, g.pp_size):
        src = dist.get_global_rank(g.pp_group, stage)
        for specs in plan[stage]:
            flat = torch.empty(sum(s.numel for s in specs), dtype=out_dtype, device=device)
            dist.recv(flat, src=src, group=g.pp_group)
            yield list(zip((s.name for s in specs), _views(flat, specs)))


def _check_destination(destination: str) -> None:
    if destination not in DESTINATIONS:
        raise ConfigError(f"destination must be one of {DESTINATIONS}, got {destination!r}")


def _views(flat: torch.Tensor, specs: list[HFTensorSpec]) -> list[torch.Tensor]:
    out, offset = [], 0
    for s in specs:
        out.append(flat[offset: offset + s.numel].view(s.shape))
        offset += s.numel
    return out


def _gather_groups(units: list[LocalParam], cfg: ModelConfig, tp_size: int, element_size: int,
                   bucket_bytes: int, expert_blocks: bool = False) -> Iterator[list[LocalParam]]:
    """Consecutive parameters up to bucket_bytes in full size (a larger one alone); with `expert_blocks`
    the experts of one layer form a group of their own (gathered by `gather_layer_experts`)."""
    group: list[LocalParam] = []
    size = 0
    for u in units:
        if expert_blocks and (u.expert != bool(group and group[0].expert) or (
                u.expert and split_layer_name(u.full_name)[0] != split_layer_name(group[0].full_name)[0])):
            if group:
                yield group
            group, size = [], 0
        if expert_blocks and u.expert:
            group.append(u)
            continue
        n = element_size
        for d in full_param_shape(u.full_name, cfg, tp_size):
            n *= d
        if group and size + n > bucket_bytes:
            yield group
            group, size = [], 0
        group.append(u)
        size += n
    if group:
        yield group


@torch.no_grad()
def _gather_full(group: list[LocalParam], params: dict, g: RankGroups, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Full (TP-merged) tensors of the group's parameters, valid on TP rank 0; one all-gather."""
    local = {u.local_name: params[u.local_name].detach().to(dtype) for u in group}
    split = [u for u in group if u.split is not TPSplit.REPLICATED]
    if g.tp_size == 1 or not split:
        return local
    flat = torch.cat([local[u.local_name].reshape(-1) for u in split])
    if dist.get_backend(g.tp_group) == "gloo":
        # only TP rank 0 keeps the result: a gather moves (tp-1)/tp of an all-gather's bytes, and on
        # CPU those bytes cost the same cores the sync's broadcast needs
        gathered = torch.empty(g.tp_size * flat.numel() if g.tp_rank == 0 else 0, dtype=dtype, device=flat.device)
        rows = list(gathered.view(g.tp_size, -1)) if g.tp_rank == 0 else None
        dist.gather(flat, rows, dst=dist.get_global_rank(g.tp_group, 0), group=g.tp_group)
        if g.tp_rank != 0:
            return local
    else:
        gathered = torch.empty(g.tp_size * flat.numel(), dtype=dtype, device=flat.device)
        _all_gather_flat(gathered, flat, group=g.tp_group)
    gathered = gathered.view(g.tp_size, -1)
    out = dict(local)
    offset = 0
    for u in split:
        shape = local[u.local_name].shape
        n = local[u.local_name].numel()
        out[u.local_name] = merge_tp([gathered[r, offset: offset + n].view(shape) for r in range(g.tp_size)],
                                     u.split)
        offset += n
    return out


def _stage_buckets(units: list[LocalParam], params: dict, cfg: ModelConfig, plan: list[list[HFTensorSpec]],
                   g: RankGroups, dtype: torch.dtype, bucket_bytes: int) -> Iterator[tuple[Bucket, torch.Tensor]]:
    """This stage's buckets in plan order on TP rank 0, each with the one flat buffer its tensors are
    views of (what a sender sends as is); other TP ranks only take part in the gathers."""
    element_size = torch.empty((), dtype=dtype).element_size()
    pending = iter(plan)
    want = next(pending, None)
    ready: dict[str, torch.Tensor] = {}
    receiver = g.tp_rank == 0 and g.dp_rank == 0
    for group in _gather_groups(units, cfg, g.tp_size, element_size, bucket_bytes, g.expert_parallel):
        if g.expert_parallel and group[0].expert:
            full = gather_layer_experts(group, params, cfg, g, dtype)  # by full name, on the receiver
            keys = [u.full_name for u in group]
        elif g.dp_rank != 0:
            continue
        else:
            full = _gather_full(group, params, g, dtype)
            keys = [u.local_name for u in group]
        if not receiver:
            continue
        for u, key in zip(group, keys):
            for name, tensor in hf_from_megatron(u.full_name, full[key], cfg):
                ready[name] = tensor  # may be a strided view: copied once, into the bucket's buffer
        while want is not None and all(s.name in ready for s in want):
            for s in want:
                if tuple(ready[s.name].shape) != s.shape:
                    raise RuntimeError(f"{s.name}: produced shape {tuple(ready[s.name].shape)}, planned {s.shape}")
            flat = torch.empty(sum(s.numel for s in want), dtype=dtype, device=ready[want[0].name].device)
            views = _views(flat, want)
            for s, view in zip(want, views):
                view.copy_(ready.pop(s.name))
            yield list(zip((s.name for s in want), views)), flat
            want = next(pending, None)
    if receiver and (want is not None or ready):
        raise RuntimeError(f"bucket plan and produced tensors disagree: left {sorted(ready)[:4]}, "
                           f"waiting for {[s.name for s in want or []][:4]}")
