"""`ParallelLayout`: this rank's process group, size and rank in every parallel dimension, made once
by start-up (erc_megatron.dist.init_distributed) and passed down to whatever needs a group.

The groups are megatron-core's own (read once from `megatron.core.parallel_state` right after it
made them), so the layout and megatron's modules always agree. Every dimension has a real group,
even of one rank: code that wants "no split" for a size-1 dimension says so itself
(`layout.tp.group if layout.tp.size > 1 else None`, the ops' "no tensor parallelism").

Rank order is megatron's default "tp-cp-ep-dp-pp": tensor-parallel neighbours are adjacent ranks,
pipeline stages are the farthest apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class GroupPlace:
    """One parallel dimension seen from this rank: its group, the group's size, this rank in it."""

    group: dist.ProcessGroup
    size: int
    rank: int

    @classmethod
    def of(cls, group: dist.ProcessGroup) -> GroupPlace:
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("this process is not a member of the given process group")
        return cls(group, dist.get_world_size(group), rank)

    @property
    def ranks(self) -> list[int]:
        """Global ranks of the group, in group-rank order."""
        return dist.get_process_group_ranks(self.group)


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits in the TP x CP x EP x DP x PP layout, with the group of each dimension."""

    launch: object
    """erc_megatron.dist.LaunchEnv: global rank, world size, launcher, rendezvous address."""
    tp: GroupPlace
    """Tensor parallel: the ranks holding shards of the same layers."""
    pp: GroupPlace
    """Pipeline parallel: one rank per stage, same TP / CP / DP position (stage = pp.rank)."""
    dp: GroupPlace
    """Data parallel (replicas that see different data), without context parallelism."""
    cp: GroupPlace
    """Context parallel: the ranks splitting one sequence."""
    dp_cp: GroupPlace
    """Data x context parallel: the ranks holding the same weights (gradients are reduced over it)."""
    ep: GroupPlace
    """Expert model parallel: the ranks splitting the experts of an MoE layer."""
    etp: GroupPlace
    """Expert tensor parallel: the ranks holding shards of the same experts (parallel.expert_tensor_parallel_size)."""
    edp: GroupPlace
    """Expert data parallel: the replicas of this rank's expert shards (expert gradients are reduced over it)."""
    mp: GroupPlace
    """Model parallel (tensor x pipeline): the ranks that together hold one copy of the model."""
    embedding: GroupPlace | None
    """First and last pipeline stage (tied input / output embedding); None on the stages in between."""

    @property
    def rank(self) -> int:
        return self.launch.rank  # type: ignore[attr-defined]

    @property
    def world_size(self) -> int:
        return self.launch.world_size  # type: ignore[attr-defined]

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp.size - 1

    def describe(self) -> str:
        return f"TP{self.tp.size}xPP{self.pp.size}xDP{self.dp.size}" + (
            f"xCP{self.cp.size}" if self.cp.size > 1 else "") + (f" EP{self.ep.size}" if self.ep.size > 1 else "")


def layout_from_parallel_state(launch) -> ParallelLayout:
    """The layout of the groups megatron's `initialize_model_parallel` just made on this rank."""
    from megatron.core import parallel_state as ps

    embedding = ps.get_embedding_group(check_initialized=False)
    # megatron sets the embedding group only on its members (first and last stage)
    in_embedding = embedding is not None and dist.get_rank(embedding) >= 0
    return ParallelLayout(
        launch=launch,
        tp=GroupPlace.of(ps.get_tensor_model_parallel_group()),
        pp=GroupPlace.of(ps.get_pipeline_model_parallel_group()),
        dp=GroupPlace.of(ps.get_data_parallel_group(with_context_parallel=False)),
        cp=GroupPlace.of(ps.get_context_parallel_group()),
        dp_cp=GroupPlace.of(ps.get_data_parallel_group(with_context_parallel=True)),
        ep=GroupPlace.of(ps.get_expert_model_parallel_group()),
        etp=GroupPlace.of(ps.get_expert_tensor_parallel_group()),
        edp=GroupPlace.of(ps.get_expert_data_parallel_group()),
        mp=GroupPlace.of(ps.get_model_parallel_group()),
        embedding=GroupPlace.of(embedding) if in_embedding else None,
    )
