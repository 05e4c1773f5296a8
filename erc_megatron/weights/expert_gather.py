"""Collect one MoE layer's experts, spread over expert-parallel and expert tensor-parallel ranks, on
the first rank of the pipeline stage (the rank that receives `iter_hf_weights`' buckets).

Megatron orders expert ranks tp-ep-dp-pp (expert TP innermost), so the rank at expert TP 0, EP 0,
expert DP 0 of a stage is global rank `stage * world / pp`: the same rank as TP 0 / DP 0 of the
dense weights. Two collectives per layer, each a plain gather to that rank's side:
1. over the expert TP group (ranks of expert DP replica 0): every expert TP shard of this EP rank's
   experts to expert TP rank 0, which merges them (`merge_tp`);
2. over the EP group of those expert TP rank 0s: the merged experts of every EP rank to EP rank 0.
Each EP rank holds the same number of experts of the same shapes, so both gathers move equal-sized
flat tensors. Other expert DP replicas hold the same weights and do nothing. On NCCL the gathers
are all-gathers (NCCL has no gather); on gloo a gather moves only the bytes that are kept.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from erc_megatron.model.config import ModelConfig

from .layout import LocalParam, local_experts, merge_tp, stage_params
from .rank_params import RankGroups

_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gather_rows(flat: torch.Tensor, group, keep: bool) -> torch.Tensor | None:
    """[group size, numel] of every member's `flat` where `keep` (the group's rank 0), else None."""
    size = dist.get_world_size(group)
    if size == 1:
        return flat.unsqueeze(0)
    if dist.get_backend(group) == "gloo":
        out = torch.empty(size * flat.numel() if keep else 0, dtype=flat.dtype, device=flat.device)
        dist.gather(flat, list(out.view(size, -1)) if keep else None, dst=dist.get_global_rank(group, 0),
                    group=group)
        return out.view(size, -1) if keep else None
    out = torch.empty(size * flat.numel(), dtype=flat.dtype, device=flat.device)
    _all_gather_flat(out, flat, group=group)
    return out.view(size, -1) if keep else None


def takes_part(g: RankGroups) -> bool:
    """Whether this rank joins `gather_layer_experts` (expert DP replica 0)."""
    return g.edp_rank == 0


@torch.no_grad()
def gather_layer_experts(units: list[LocalParam], params: dict[str, torch.nn.Parameter], cfg: ModelConfig,
                         g: RankGroups, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Full expert tensors of one layer (`units`: its expert weights by global name, every expert), keyed by
    full Megatron name, on the stage's first rank; {} on every other rank. Collective over the ranks
    where `takes_part`."""
    if not takes_part(g):
        return {}
    etp_group = g.etp_group if g.etp_group is not None else g.tp_group
    etp_rank = g.etp_rank if g.etp_rank is not None else g.tp_rank
    own = set(local_experts(cfg, g.ep_rank, g.ep_size))
    to_local = {p.full_name: p.local_name for p in stage_params(cfg, g.pp_rank, g.pp_size, g.ep_rank, g.ep_size)}
    mine = [u for u in units if _expert_index(u) in own]
    shards = [params[to_local[u.full_name]].detach().to(dtype) for u in mine]
    rows = _gather_rows(torch.cat([s.reshape(-1) for s in shards]), etp_group, keep=etp_rank == 0)
    if rows is None:
        return {}
    merged = []
    offset = 0
    for u, shard in zip(mine, shards):
        n = shard.numel()
        merged.append(merge_tp([rows[r, offset: offset + n].view(shard.shape) for r in range(rows.shape[0])],
                               u.split))
        offset += n
    ep_group = g.ep_group
    rows = _gather_rows(torch.cat([m.reshape(-1) for m in merged]), ep_group, keep=g.ep_rank == 0) \
        if ep_group is not None else torch.cat([m.reshape(-1) for m in merged]).unsqueeze(0)
    if rows is None:
        return {}
    out: dict[str, torch.Tensor] = {}
    for ep_rank in range(rows.shape[0]):
        theirs = set(local_experts(cfg, ep_rank, g.ep_size))
        offset = 0
        for u, m in zip([u for u in units if _expert_index(u) in theirs], merged):
            out[u.full_name] = rows[ep_rank, offset: offset + m.numel()].view(m.shape)
            offset += m.numel()
    return out


def _expert_index(u: LocalParam) -> int:
    from .layout import expert_of

    found = expert_of(u.full_name)
    if found is None:
        raise ValueError(f"{u.full_name} is not an expert weight")
    return found[0]


__all__ = ["gather_layer_experts", "takes_part"]
