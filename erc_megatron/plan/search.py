"""Every layout of a GPU count that megatron-core accepts for a model, those that fit the GPU
memory, ranked by an estimate of the learner's time per step (lowest first).

The estimate (`step_seconds`) is deliberately simple and states its assumptions:
- compute: 6 x matmul parameters x tokens per update (forward + backward) plus 2 x for the
  old-policy forward, at `mfu` of `peak_tflops` per GPU; a pipeline runs at the pace of its
  slowest stage (the last one also holds the output layer), so the stage with the most matmul
  parameters counts pp times; full recomputation adds one forward (8/6 of the update); the 1F1B
  bubble multiplies the update by (1 + (pp - 1) / m) for m micro-batches per optimizer step;
- communication: the busiest rank's bytes per group over that group's bandwidth, NVLink
  (`intra_node_gbps`) for groups inside one node (`gpus_per_node`), the NIC (`inter_node_gbps`)
  for groups spanning nodes; TP and EP are on the critical path, DP and weight sync are counted
  whole (no overlap assumed: overlap_grad_reduce is off).
Layouts that use more than `crowded` (90%) of the GPU memory are ranked after all others (the
activation model is approximate: on CPU it undercounts the measured peak, README "Planner"); ties go
to the layout with more free memory.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from erc_megatron.plan.comm import Event, predict_step, rank_coords
from erc_megatron.plan.inputs import Arch, Layout, StepShapes, Workload, default_shapes
from erc_megatron.plan.memory import MemoryBreakdown, rank_memory
from erc_megatron.plan.params import stage_matmul_params


@dataclass(frozen=True)
class Hardware:
    gpus: int = 8
    gpu_memory_bytes: int = 80 * 10**9
    gpus_per_node: int = 8
    peak_tflops: float = 989.0
    """bf16 dense peak of an H100/H200 SXM."""
    mfu: float = 0.35
    intra_node_gbps: float = 360.0
    """GB/s one GPU moves through NVLink in a collective (measured bus bandwidth of H100 NVLink, about)."""
    inter_node_gbps: float = 45.0
    """GB/s of a 400 Gb/s NIC per GPU at 90%."""
    reserve_bytes: int = 4 * 2**30
    """CUDA context, NCCL buffers, allocator fragmentation."""


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryBreakdown
    events: list[Event]
    seconds: float
    fits: bool


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problems(arch: Arch, layout: Layout, work: Workload) -> list[str]:
    """Why megatron-core (or this project) refuses the layout; empty if it is accepted."""
    out = []
    tp = layout.tp
    for name, value in (("num_attention_heads", arch.heads), ("num_query_groups", arch.groups),
                        ("ffn_hidden_size", arch.ffn)):
        if value % tp:
            out.append(f"{name} ({value}) is not divisible by tensor_model_parallel_size ({tp})")
    if arch.num_layers % layout.pp:
        out.append(f"num_layers ({arch.num_layers}) is not divisible by pipeline_model_parallel_size ({layout.pp})")
    if layout.sp and tp == 1:
        out.append("sequence_parallel needs tensor_model_parallel_size > 1")
    if arch.is_moe:
        if arch.num_experts % layout.ep:
            out.append(f"num_experts ({arch.num_experts}) is not divisible by expert_model_parallel_size ({layout.ep})")
        if layout.world % (layout.etp * layout.ep * layout.pp):
            out.append(f"world {layout.world} is not divisible by expert TP x EP x PP "
                       f"({layout.etp} x {layout.ep} x {layout.pp})")
        if arch.moe_ffn % layout.etp:
            out.append(f"moe_ffn_hidden_size ({arch.moe_ffn}) is not divisible by expert_tensor_parallel_size "
                       f"({layout.etp})")
        if tp > 1 and not layout.sp:
            out.append("MoE with tensor_model_parallel_size > 1 needs sequence_parallel (megatron-core)")
    elif layout.ep > 1 or layout.etp > 1:
        out.append("expert parallelism on a dense model")
    if layout.distopt and layout.dp == 1 and layout.edp == 1:
        out.append("the distributed optimizer shards over data parallelism, which is 1")
    return out


def enumerate_layouts(arch: Arch, gpus: int, gpus_per_node: int = 8) -> Iterator[Layout]:
    for tp in divisors(min(gpus, gpus_per_node)):
        for pp in divisors(gpus // tp):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            eps = [e for e in divisors(gpus // pp) if arch.is_moe and e * 1 <= gpus // pp] if arch.is_moe else [1]
            for ep in eps:
                for etp in ([1, tp] if arch.is_moe and tp > 1 else [1]):
                    if (ep * etp) > gpus // pp or (gpus // pp) % (ep * etp):
                        continue
                    for distopt in ([False, True] if dp > 1 else [False]):
                        for sp in ([False, True] if tp > 1 else [False]):
                            # selective recomputation only drops the [s, s] attention scores, which
                            # flash attention (Transformer Engine on GPU) never keeps
                            for recompute in (None, "full"):
                                yield Layout(tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, distopt=distopt, sp=sp,
                                             recompute=recompute)


def _group_gbps(layout: Layout, role: str, hw: Hardware) -> float:
    """Bandwidth of a role's group: NVLink if its ranks share a node."""
    span = {"TP": layout.tp, "EP": layout.ep * layout.etp, "DP": layout.tp * layout.dp,
            "PP": layout.world, "MP": layout.tp * layout.pp * layout.dp}.get(role, layout.world)
    return hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps


def step_seconds(arch: Arch, layout: Layout, work: Workload, shapes: StepShapes, events: list[Event],
                 hw: Hardware) -> float:
    tokens = shapes.tokens * sum(shapes.updates) * layout.dp
    weights = layout.pp * max(stage_matmul_params(arch, layout.pp, s) for s in range(layout.pp))
    flops = 6 * weights * tokens * (8 / 6 if layout.recompute == "full" else 1.0)
    m = max(shapes.updates) if shapes.updates else 1
    flops *= 1 + (layout.pp - 1) / max(m, 1)
    flops += 2 * weights * shapes.tokens * shapes.old_policy * layout.dp
    compute = flops / (layout.world * hw.peak_tflops * 1e12 * hw.mfu)
    per_rank: dict[int, float] = {}
    for ev in events:
        if ev.role in ("world", "weight-sync", "statistics"):
            continue  # the same for every layout
        per_rank[ev.rank] = per_rank.get(ev.rank, 0.0) + ev.bytes / (_group_gbps(layout, ev.role, hw) * 1e9)
    return compute + max(per_rank.values(), default=0.0)


def evaluate(arch: Arch, layout: Layout, work: Workload, hw: Hardware, shapes: StepShapes | None = None,
             flash_attention: bool = True) -> Candidate:
    shapes = shapes or default_shapes(work, layout)
    memory = rank_memory(arch, layout, work, shapes, hw.reserve_bytes, flash_attention)
    events = predict_step(arch, layout, work, shapes)
    seconds = step_seconds(arch, layout, work, shapes, events, hw)
    return Candidate(layout, memory, events, seconds, memory.total <= hw.gpu_memory_bytes)


def search(arch: Arch, work: Workload, hw: Hardware, limit: int | None = None, crowded: float = 0.9) -> list[Candidate]:
    """Layouts that fit, best first (see the module docstring)."""
    out = []
    for layout in enumerate_layouts(arch, hw.gpus, hw.gpus_per_node):
        if layout_problems(arch, layout, work):
            continue
        shapes = default_shapes(work, layout)
        if rank_memory(arch, layout, work, shapes, hw.reserve_bytes).total > hw.gpu_memory_bytes:
            continue  # cheap test first: the communication prediction walks every rank
        out.append(evaluate(arch, layout, work, hw, shapes))
    out.sort(key=lambda c: (c.memory.total > crowded * hw.gpu_memory_bytes, c.seconds, c.memory.total))
    return out[:limit] if limit else out


__all__ = ["Candidate", "Hardware", "enumerate_layouts", "evaluate", "layout_problems", "rank_coords", "search",
           "step_seconds"]
