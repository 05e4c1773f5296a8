"""Parameter counts per rank and per pipeline stage, in megatron-core's module order.

Pure functions of the architecture and the layout. A parameter is either split over tensor
parallelism (linear layers, vocabulary rows) or replicated (norms, the MoE router); expert weights
are split over expert parallelism (whole experts) and expert tensor parallelism, and their
gradients are reduced over the expert data-parallel group instead of the data-parallel one.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from erc_megatron.plan.inputs import Arch, Layout


@dataclass(frozen=True)
class Param:
    """One parameter tensor as one rank holds it."""

    local: int
    """Elements on this rank."""
    full: int
    """Elements of the Hugging Face tensor(s) it exports to (vocabulary unpadded)."""
    split: bool
    """Split over (expert) tensor parallelism; replicated parameters travel in no TP gather."""
    expert: bool = False
    norm: bool = False
    """An RMSNorm weight (all-reduced over TP under sequence parallelism)."""
    qk_norm: bool = False


def stage_layers(arch: Arch, pp: int, stage: int) -> range:
    per = arch.num_layers // pp
    return range(stage * per, (stage + 1) * per)


def layer_params(arch: Arch, layout: Layout, index: int) -> list[Param]:
    """The parameters of layer `index` on one rank, in module order."""
    return list(_layer_params(arch, Layout(tp=layout.tp, ep=layout.ep, etp=layout.etp), index in arch.moe_layers))


@lru_cache(maxsize=256)
def _layer_params(arch: Arch, layout: Layout, moe: bool) -> tuple[Param, ...]:
    h, d, tp = arch.hidden, arch.head_dim, layout.tp
    q, kv = arch.heads * d, arch.groups * d
    out = [Param(h, h, False, norm=True)]
    out.append(Param((q + 2 * kv) * h // tp, (q + 2 * kv) * h, True))
    if arch.qkv_bias:
        out.append(Param((q + 2 * kv) // tp, q + 2 * kv, True))
    out.append(Param(h * q // tp, h * q, True))
    if arch.qk_norm:
        out += [Param(d, d, False, qk_norm=True), Param(d, d, False, qk_norm=True)]
    out.append(Param(h, h, False, norm=True))
    if moe:
        out.append(Param(arch.num_experts * h, arch.num_experts * h, False))  # router, replicated
        local_experts = arch.num_experts // layout.ep
        f = arch.moe_ffn
        for _ in range(local_experts):
            out.append(Param(2 * f * h // layout.etp, 2 * f * h, True, expert=True))
            out.append(Param(h * f // layout.etp, h * f, True, expert=True))
    else:
        out.append(Param(2 * arch.ffn * h // tp, 2 * arch.ffn * h, True))
        out.append(Param(h * arch.ffn // tp, h * arch.ffn, True))
    return tuple(out)


def stage_params(arch: Arch, layout: Layout, stage: int, divisible_by: int = 128) -> list[Param]:
    """The parameters one rank of pipeline stage `stage` holds, in module order."""
    # only the sizes matter: layouts differing in switches (distopt, SP, recompute) share one entry
    shape = Layout(tp=layout.tp, pp=layout.pp, ep=layout.ep, etp=layout.etp)
    return list(_stage_params(arch, shape, stage, divisible_by))


@lru_cache(maxsize=1024)
def _stage_params(arch: Arch, layout: Layout, stage: int, divisible_by: int) -> tuple[Param, ...]:
    vp = arch.padded_vocab(layout.tp, divisible_by)
    emb = Param(vp * arch.hidden // layout.tp, arch.vocab * arch.hidden, True)
    out: list[Param] = []
    if stage == 0:
        out.append(emb)
    for i in stage_layers(arch, layout.pp, stage):
        out += _layer_params(arch, Layout(tp=layout.tp, ep=layout.ep, etp=layout.etp), i in arch.moe_layers)
    if stage == layout.pp - 1:
        out.append(Param(arch.hidden, arch.hidden, False, norm=True))
        if not arch.tied:
            out.append(emb)
        elif layout.pp > 1:  # the last stage's copy of the tied embedding: trained, not exported
            out.append(Param(emb.local, 0, True))
    return tuple(out)


def count(params: list[Param], expert: bool | None = None) -> int:
    return sum(p.local for p in params if expert is None or p.expert == expert)


def total_params(arch: Arch) -> int:
    one = Layout()
    return sum(p.full for s in range(1) for p in stage_params(arch, one, s))


def active_params(arch: Arch) -> int:
    """Parameters one token passes through (MoE: top-k experts of each MoE layer)."""
    full = total_params(arch)
    if not arch.is_moe:
        return full
    per_expert = 3 * arch.moe_ffn * arch.hidden
    return full - len(arch.moe_layers) * (arch.num_experts - arch.topk) * per_expert


def stage_matmul_params(arch: Arch, pp: int, stage: int) -> int:
    """Weights one token multiplies on `stage` (the input embedding is a lookup; MoE layers count
    their top-k experts): what its forward FLOPs are proportional to."""
    one = Layout(pp=pp)
    ps = stage_params(arch, one, stage)
    dense = sum(p.full for p in ps if not p.expert and not p.norm and not p.qk_norm)
    if stage == 0:
        dense -= arch.vocab * arch.hidden
    moe_layers = [i for i in stage_layers(arch, pp, stage) if i in arch.moe_layers]
    return dense + len(moe_layers) * arch.topk * 3 * arch.moe_ffn * arch.hidden
