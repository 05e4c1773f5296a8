"""This rank's place in the TP x PP x DP layout and its GPTModel parameters, checked against `layout`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from erc_megatron.model.config import ConfigError, ModelConfig

from .layout import LocalParam, canonical_name, stage_layers, stage_params


@dataclass(frozen=True)
class RankGroups:
    """The process groups a weight transfer needs, and this rank's position in them."""

    tp_group: object
    """Tensor-parallel group (the ranks holding shards of the same parameters)."""
    pp_group: object
    """Pipeline group (same TP / DP position, one rank per stage)."""
    dp_group: object
    """Data-parallel group including context parallelism (replicas of the same weights)."""
    tp_rank: int
    """Rank in tp_group."""
    tp_size: int
    """Size of tp_group."""
    pp_rank: int
    """Rank in pp_group (the pipeline stage)."""
    pp_size: int
    """Size of pp_group."""
    dp_rank: int
    """Rank in dp_group."""
    ep_rank: int = 0
    """Expert-parallel rank (which experts this rank holds); 0 for a dense model."""
    ep_size: int = 1
    """Expert-parallel size."""
    etp_rank: int | None = None
    """Rank in the expert tensor-parallel group (None: the same as tp_rank)."""
    etp_size: int | None = None
    """Expert tensor-parallel size (None: the same as tp_size)."""
    etp_group: object | None = None
    """Expert tensor-parallel group (None: tp_group)."""
    ep_group: object | None = None
    """Expert-parallel group (same expert TP and expert DP position, one rank per expert shard)."""
    edp_rank: int = 0
    """Rank among the replicas of this rank's experts (expert data parallel)."""

    @property
    def expert_parallel(self) -> bool:
        """Whether experts are laid out differently from the dense weights (EP > 1 or expert TP != TP)."""
        return self.ep_size > 1 or (self.etp_size is not None and self.etp_size != self.tp_size)

    def split_rank(self, expert: bool) -> tuple[int, int]:
        """(rank, size) in the group a parameter is split over: the expert TP group for expert weights."""
        if expert and self.etp_size is not None:
            return self.etp_rank, self.etp_size
        return self.tp_rank, self.tp_size


def rank_groups(layout=None) -> RankGroups:
    """The groups of `layout` (erc_megatron.dist.ParallelLayout; None: the one init_distributed made)."""
    from erc_megatron.dist import current_layout

    layout = layout or current_layout()
    return RankGroups(layout.tp.group, layout.pp.group, layout.dp_cp.group, layout.tp.rank, layout.tp.size,
                      layout.pp.rank, layout.pp.size, layout.dp_cp.rank,
                      ep_rank=layout.ep.rank, ep_size=layout.ep.size, etp_rank=layout.etp.rank,
                      etp_size=layout.etp.size, etp_group=layout.etp.group, ep_group=layout.ep.group,
                      edp_rank=layout.edp.rank)


def unwrap_model(model) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ConfigError(f"virtual pipeline parallelism is not supported: got {len(model)} model chunks")
        model = model[0]
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def rank_parameters(model, cfg: ModelConfig, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1
                    ) -> tuple[list[LocalParam], dict[str, torch.nn.Parameter]]:
    """This stage's parameter plan (with EP rank `ep_rank`'s experts) and its parameters by local-spec
    name; fails if the model differs."""
    gpt = unwrap_model(model)
    params = {canonical_name(n): p for n, p in gpt.named_parameters()}
    plan = stage_params(cfg, pp_rank, pp_size, ep_rank, ep_size)
    want = {p.local_name for p in plan}
    missing, unexpected = sorted(want - set(params)), sorted(set(params) - want)
    if missing or unexpected:
        raise ConfigError(f"the GPTModel of pipeline stage {pp_rank}/{pp_size} does not match the model config: "
                          f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    # megatron numbers layers globally (1-based) in layer_number; an uneven split would show here
    layers = getattr(getattr(gpt, "decoder", None), "layers", None)
    if layers is not None:
        expected = [i + 1 for i in stage_layers(cfg, pp_rank, pp_size)]
        got = [getattr(layer, "layer_number", None) for layer in layers]
        if None not in got and got != expected:
            raise ConfigError(f"pipeline stage {pp_rank} holds layers {got} (1-based), expected an even split "
                              f"{expected}; uneven pipeline splits are not supported")
    return plan, params
