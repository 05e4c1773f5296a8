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
params_dtype) before they are gathered. A bucket's tensors are views of one flat buffer, filled
by one copy per TP shard straight from the gathered rows (no merged tensor is ever made: each
shard's pieces go to their places in the HF tensors), which a sender sends as is; a new
buffer per bucket, so a bucket stays valid after the next optimizer step, unless the caller passes
`TransferBuffers` to reuse (see transfer_buffers: on CPU, fresh pages cost more than the copies).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from erc_megatron.model.config import ConfigError, ModelConfig
from erc_megatron.model.gpt import torch_dtype

from .expert_gather import gather_layer_experts, takes_part
from .hf_convert import HFPiece, check_hf_compatible, hf_names, hf_pieces_from_shard, hf_shape, piece_place
from .layout import LocalParam, TPSplit, full_param_shape, split_layer_name, stage_params
from .rank_params import RankGroups, rank_groups, rank_parameters
from .transfer_buffers import TransferBuffers

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
                    destination: str = "stage", layout=None,
                    buffers: TransferBuffers | None = None) -> Iterator[Bucket]:
    """Yield HF (name, tensor) buckets on the receiving ranks (see module docstring); run on all ranks.

    `layout`: erc_megatron.dist.ParallelLayout (None: the one init_distributed made). `buffers`: where
    scratch space and bucket buffers come from (None: fresh ones for this call, every bucket a new
    buffer that stays the caller's); a caller passing its own hands each bucket back with
    `buffers.release(bucket tensor)` once done with it, after which its contents change."""
    buffers = buffers if buffers is not None else TransferBuffers(reuse_buckets=False)
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
                         bucket_bytes, buffers)
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
                buffers.release(in_flight[1])
            in_flight = (dist.isend(flat, dst=first, group=g.pp_group), flat)
        if in_flight is not None:
            in_flight[0].wait()
            buffers.release(in_flight[1])
        return
    yield from (bucket for bucket, _ in own)
    device = next(iter(params.values())).device
    for stage in range(1, g.pp_size):
        src = dist.get_global_rank(g.pp_group, stage)
        for specs in plan[stage]:
            flat = buffers.bucket(sum(s.numel for s in specs), out_dtype, device)
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
def _gather_shards(group: list[LocalParam], params: dict, g: RankGroups, dtype: torch.dtype,
                   buffers: TransferBuffers) -> dict[str, list[torch.Tensor]]:
    """Every TP rank's shard of the group's parameters (one entry for a replicated one), valid on TP
    rank 0; one gather (gloo) or all-gather (NCCL). Shards and gathered rows live in `buffers`'
    scratch space: valid until the next group's gather. Nothing is merged here: each shard is copied
    straight into its place in the HF tensors (`hf_pieces_from_shard`)."""
    split = [u for u in group if u.split is not TPSplit.REPLICATED]
    # unsplit ones as they are: the copy into the bucket casts them
    out = {u.local_name: [params[u.local_name].detach()] for u in group
           if g.tp_size == 1 or u.split is TPSplit.REPLICATED}
    if g.tp_size == 1 or not split:
        return out
    shards = [params[u.local_name].detach() for u in split]
    device = shards[0].device
    flat = buffers.scratch("shards", sum(t.numel() for t in shards), dtype, device)
    offset = 0
    for t in shards:  # one copy (and cast) per shard, no concatenated temporary
        flat[offset: offset + t.numel()].view(t.shape).copy_(t)
        offset += t.numel()
    gloo = dist.get_backend(g.tp_group) == "gloo"
    keep = g.tp_rank == 0 or not gloo
    gathered = buffers.scratch("gathered", g.tp_size * flat.numel() if keep else 0, dtype, device)
    if gloo:
        # only TP rank 0 keeps the result: a gather moves (tp-1)/tp of an all-gather's bytes, and on
        # CPU those bytes cost the same cores the sync's broadcast needs
        rows = list(gathered.view(g.tp_size, -1)) if keep else None
        dist.gather(flat, rows, dst=dist.get_global_rank(g.tp_group, 0), group=g.tp_group)
        if not keep:
            return {}
    else:
        _all_gather_flat(gathered, flat, group=g.tp_group)
    gathered = gathered.view(g.tp_size, -1)
    offset = 0
    for u, t in zip(split, shards):
        out[u.local_name] = [gathered[r, offset: offset + t.numel()].view(t.shape) for r in range(g.tp_size)]
        offset += t.numel()
    return out


def _stage_buckets(units: list[LocalParam], params: dict, cfg: ModelConfig, plan: list[list[HFTensorSpec]],
                   g: RankGroups, dtype: torch.dtype, bucket_bytes: int,
                   buffers: TransferBuffers) -> Iterator[tuple[Bucket, torch.Tensor]]:
    """This stage's buckets in plan order on TP rank 0, each with the one flat buffer its tensors are
    views of (what a sender sends as is); other TP ranks only take part in the gathers. Each HF tensor
    is copied once, into its bucket's buffer, as soon as its gather group is gathered."""
    element_size = torch.empty((), dtype=dtype).element_size()
    where = {s.name: (b, i) for b, specs in enumerate(plan) for i, s in enumerate(specs)}
    filling: dict[int, tuple[torch.Tensor, list[torch.Tensor], set[int]]] = {}  # bucket -> flat, views, missing
    next_out = 0
    receiver = g.tp_rank == 0 and g.dp_rank == 0
    failure: Exception | None = None
    for group in _gather_groups(units, cfg, g.tp_size, element_size, bucket_bytes, g.expert_parallel):
        if g.expert_parallel and group[0].expert:
            experts = gather_layer_experts(group, params, cfg, g, dtype)  # by full name, on the receiver
            shards = {name: [t] for name, t in experts.items()}
            keys = [u.full_name for u in group]
        elif g.dp_rank != 0:
            continue
        else:
            shards = _gather_shards(group, params, g, dtype, buffers)
            keys = [u.local_name for u in group]
        if not receiver or failure is not None:
            continue  # after a failure the gathers still run to the end: the TP peers wait in them
        try:
            for u, key in zip(group, keys):
                for rank, shard in enumerate(shards[key]):
                    for piece in hf_pieces_from_shard(u.full_name, shard, cfg, rank, len(shards[key])):
                        _fill(piece, plan, where, filling, next_out, buffers, dtype)
        except Exception as exc:  # noqa: BLE001 - raised once every gather is done
            failure = exc
            continue
        while next_out in filling and not filling[next_out][2]:
            flat, views, _ = filling.pop(next_out)
            yield list(zip((s.name for s in plan[next_out]), views)), flat
            next_out += 1
    if failure is not None:
        raise failure
    if receiver and next_out != len(plan):
        waiting = [plan[b][i].name for b in sorted(filling) for i in sorted(filling[b][2])]
        raise RuntimeError(f"bucket plan and produced tensors disagree: {len(plan) - next_out} buckets not "
                           f"complete, waiting for {(waiting or [s.name for s in plan[next_out]])[:4]}")


def _fill(piece: HFPiece, plan: list[list[HFTensorSpec]], where: dict[str, tuple[int, int]],
          filling: dict, next_out: int, buffers: TransferBuffers, dtype: torch.dtype) -> None:
    """Copy one piece of an HF tensor into its planned place, opening its bucket's buffer on first use;
    the tensor is done once all its elements arrived."""
    name, tensor, dim, start = piece
    b, i = where.get(name, (None, None))
    if b is None or b < next_out or (b in filling and i not in filling[b][2]):
        raise RuntimeError(f"bucket plan and produced tensors disagree: {name} is "
                           f"{'not planned' if b is None else 'produced twice'}")
    if b not in filling:
        flat = buffers.bucket(sum(s.numel for s in plan[b]), dtype, tensor.device)
        filling[b] = (flat, _views(flat, plan[b]), {j: s.numel for j, s in enumerate(plan[b])})
    view = filling[b][1][i]
    try:
        place = piece_place(view, tensor, dim, start)
        if place.shape != tensor.shape:
            raise RuntimeError(f"it would fill {tuple(place.shape)}")
    except RuntimeError as exc:
        raise RuntimeError(f"{name}: a piece of shape {tuple(tensor.shape)} at {start} along dim {dim} does not "
                           f"fit the planned shape {tuple(view.shape)} ({exc})") from None
    place.copy_(tensor)
    missing = filling[b][2]
    missing[i] -= tensor.numel()
    if missing[i] <= 0:
        del missing[i]
