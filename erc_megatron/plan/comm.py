"""Every collective of one RL step, per rank, process group (role) and phase: counts and bytes.

Pure functions of the architecture, the layout, the workload and the step's micro-batch shapes.
Bytes are what `erc_megatron.comm` records: per call, the larger of this rank's input and output
buffers (nccl-tests' message size: an all-reduce's tensor, an all-gather's gathered output, a
reduce-scatter's full input, a batched p2p call's larger direction). Roles are the profiler's
(`erc_megatron.comm.profiler.ROLES`). What issues them, as read in megatron-core 0.16:

- TP, per layer and micro-batch (local spec and Transformer Engine alike): without sequence
  parallelism two all-reduces of [tokens, hidden] forward (attention and MLP outputs) and two
  backward (the input gradients of the QKV and FC1 column-parallel layers); with it, forward two
  all-gathers and two reduce-scatters, backward four all-gathers (the saved sequence shard is
  gathered again for the weight gradient, and the output gradient of each row-parallel layer) and
  two reduce-scatters. The embedding all-reduces (SP: reduce-scatters) its output; the output
  layer all-reduces its input gradient. The log-prob op adds one all-gather of [4, tokens] fp32
  statistics per forward on the last stage. Under SP (and for Qwen3's q/k norms) finalize_model_grads
  all-reduces the norm gradients once per optimizer step.
- PP: megatron's non-interleaved 1F1B schedule with batched p2p (simulated call by call, so
  counts are exact); each message is one micro-batch's [s (/tp under SP), b, hidden].
- DP: the DDP gradient buffer (fp32) is all-reduced once per optimizer step (one bucket: overlap
  is off); with the distributed optimizer each bucket is reduce-scattered instead and the updated
  bf16 parameters all-gathered after the step (buffers padded as megatron pads them). Expert
  buffers do the same over the expert data-parallel group (role EP). With experts, megatron chains
  two distributed optimizers (dense, expert) and each all-gathers every buffer after its step, so
  each buffer's all-gather happens twice per optimizer step.
- EP (MoE alltoall dispatcher): per MoE layer and forward, an all-gather of the [experts] token
  counts over the expert TP x EP group, all-to-alls of the permuted tokens ([tokens x topk,
  hidden]) and their routing probabilities (fp32), one back to combine; backward the three
  all-to-alls again; with expert TP an all-gather (dispatch) and a reduce-scatter (combine) of the
  tokens over expert TP. The aux load-balancing loss all-reduces the [experts] counts over TP x CP.
  The all-to-alls' bytes depend on routing (balanced routing assumed): an estimate, ESTIMATED_OPS.
- MP: the optimizer's grad-norm all-reduce (one fp32 scalar per optimizer step; over the whole
  distributed-optimizer instance when that is on, role DP).
- statistics: the step statistics' two world all-reduces (SUM, MAX; float64) per optimizer step.
- weight sync (erc_megatron/weights/hf_stream.py): per gather group a TP gather (gloo) or
  all-gather (NCCL) of the split parameters on data-parallel replica 0; with `destination="rank0"`
  later stages' buckets go to rank 0 over PP (isend / recv) and rank 0 broadcasts every bucket on
  the weight-sync group, with `"stage"` each stage's leader broadcasts its own; one pickled outcome
  broadcast on the world group. MoE (erc_megatron/weights/expert_gather.py): on expert DP replica 0,
  one gather per MoE layer of every EP rank's experts to EP rank 0; the broadcast carries all experts.
- world: the rollout reaches every rank in one pickled broadcast (an estimate: pickle sizes are
  not a function of shapes).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from erc_megatron.plan.inputs import Arch, Layout, StepShapes, Workload
from erc_megatron.plan.params import Param, count, stage_layers, stage_params

ESTIMATED_ROLES = ("world",)
"""Roles whose bytes are estimates (pickled Python objects), left out of agreement checks."""

ESTIMATED_OPS = (("EP", "all_to_all"),)
"""(role, op family) pairs whose bytes are estimates, checked apart from the rest of their role. The
alltoall dispatcher's all-to-alls move as many tokens to each EP rank as the router sends to its
experts: the recorder's size of one call (the larger of the sent and received buffers) depends on the
routing decisions, which the data decide. The prediction assumes balanced routing (every rank receives
as many tokens as it sends); the call count is exact."""


def estimate_key(role: str, op: str) -> str:
    """The role an event of an estimated op is reported under (its own row, marked as an estimate)."""
    return f"{role}:{op}" if (role, op) in ESTIMATED_OPS else role


@dataclass(frozen=True)
class Event:
    rank: int
    phase: str
    role: str
    op: str
    """Operation family: all_reduce, all_gather, reduce_scatter, all_to_all, p2p, gather, broadcast,
    broadcast_object."""
    count: int
    bytes: int


def op_family(op: str) -> str:
    """The family of a recorded torch.distributed function name."""
    if op in ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list"):
        return "broadcast_object" if op == "broadcast_object_list" else op
    for family in ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast", "gather"):
        if op.startswith(family) or op.startswith("_" + family):
            return family
    if op in ("batch_isend_irecv", "isend", "irecv", "send", "recv"):
        return "p2p"
    return op


def rank_coords(rank: int, layout: Layout) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) in megatron's default order tp-cp-ep-dp-pp (cp = 1)."""
    return rank % layout.tp, (rank // layout.tp) % layout.dp, rank // (layout.tp * layout.dp)


@lru_cache(maxsize=4096)
def pipeline_p2p_calls(stage: int, pp: int, n: int, forward_only: bool) -> list[tuple[int, int]]:
    """(messages sent, messages received) of each batched p2p call megatron's non-interleaved
    schedule issues on `stage` for `n` micro-batches."""
    if pp == 1 or n == 0:
        return []
    first, last = stage == 0, stage == pp - 1
    calls: list[tuple[int, int]] = []

    def comm(send: int, recv: int) -> None:
        if send or recv:
            calls.append((send, recv))

    prev, nxt = 0 if first else 1, 0 if last else 1
    warmup = min(pp - stage - 1, n)
    remaining = n - warmup
    for _ in range(warmup):
        comm(0, prev)  # recv_forward
        comm(nxt, 0)  # send_forward
    if remaining:
        comm(0, prev)
    for i in range(remaining):
        final = i == remaining - 1
        if forward_only:
            comm(nxt, 0)
            if not final:
                comm(0, prev)
        else:
            comm(nxt, nxt)  # send_forward_recv_backward
            comm(prev, 0 if final else prev)  # send_backward (+ recv_forward)
    if not forward_only:
        for _ in range(warmup):
            comm(0, nxt)  # recv_backward
            comm(prev, 0)  # send_backward
    return calls


def grad_buffer_ranges(params: list[Param], distopt: bool, dp: int) -> tuple[list[tuple[int, int]], int]:
    """([start, end) of each parameter, buffer elements) of megatron's gradient buffer (one bucket):
    filled in reverse (backprop) order; with the distributed optimizer each parameter starts at a
    multiple of 64 and the end is padded to a multiple of lcm(dp, 128)."""
    ranges, index = [], 0
    for p in reversed(params):
        if distopt:
            index = -(-index // 64) * 64
        ranges.append((index, index + p.local))
        index += p.local
    if distopt and params:
        div = math.lcm(dp, 128)
        index = -(-index // div) * div
    return ranges, index


def grad_buffer_numel(params: list[Param], distopt: bool, dp: int) -> int:
    """Elements of megatron's gradient (and, with distopt, parameter) buffer for these params."""
    return grad_buffer_ranges(params, distopt, dp)[1]


def distopt_shard_numel(params: list[Param], dp: int, dp_rank: int) -> int:
    """Parameter elements in data-parallel rank `dp_rank`'s shard of the buffer (what its optimizer
    state covers under the distributed optimizer)."""
    ranges, total = grad_buffer_ranges(params, True, dp)
    size = total // dp
    lo, hi = dp_rank * size, (dp_rank + 1) * size
    return sum(max(0, min(end, hi) - max(start, lo)) for start, end in ranges)


def statistics_sizes(loss: dict, with_nll: bool) -> tuple[int, int]:
    """Elements of the step statistics' SUM and MAX vectors (train/update.py's packing)."""
    from erc_megatron.algo import PolicyLossConfig, StepStats
    from erc_megatron.train.update import _NONFINITE_CHECKS, _identity_metrics

    fields = set(PolicyLossConfig.__dataclass_fields__)
    cfg = PolicyLossConfig(**{k: v for k, v in loss.items() if k in fields})
    stats = StepStats()
    for m in _identity_metrics(cfg, with_nll):
        stats.add(m)
    for flag in _NONFINITE_CHECKS:
        stats.add_scalar(flag, 0.0, "max")
    sums, maxes, mins, means = stats.layout()
    return len(sums) + 2 * len(means), len(maxes) + len(mins) + 2


def sync_buckets(params: list[Param], bucket_bytes: int, elem: int) -> list[int]:
    """Bytes of each weight-sync bucket of one stage (greedy in order, as hf_stream packs)."""
    out: list[int] = []
    size = 0
    for p in params:
        n = p.full * elem
        if n == 0:
            continue
        if size and size + n > bucket_bytes:
            out.append(size)
            size = 0
        size += n
    if size:
        out.append(size)
    return out


def gather_groups(params: list[Param], layout: Layout, bucket_bytes: int, elem: int) -> list[int]:
    """Per gather group of one stage, bytes of this rank's split shards (what one TP gather sends)."""
    out, size, shard = [], 0, 0
    for p in params:
        if p.split and p.full == 0:
            continue  # the tied output copy exports nothing
        full = p.local * (layout.etp if p.expert else layout.tp) if p.split else p.local
        n = full * elem
        if size and size + n > bucket_bytes:
            out.append(shard)
            size, shard = 0, 0
        size += n
        if p.split and not p.expert:
            shard += p.local * elem
    if size:
        out.append(shard)
    return out


def predict_step(arch: Arch, layout: Layout, work: Workload, shapes: StepShapes,
                 rollout_bytes: int | None = None) -> list[Event]:
    """Every collective of one step on every rank."""
    acc: dict[tuple[int, str, str, str], list[int]] = defaultdict(lambda: [0, 0])

    def add(rank: int, phase: str, role: str, op: str, nbytes: int, n: int = 1) -> None:
        if n <= 0:
            return
        slot = acc[(rank, phase, role, op)]
        slot[0] += n
        slot[1] += n * int(nbytes)

    e, tp, pp = work.param_bytes, layout.tp, layout.pp
    t, h = shapes.tokens, arch.hidden
    r = tp if layout.sp else 1
    act = t * h * e
    stat_bytes = 4 * t * 4  # [4, tokens] fp32 statistics of the log-prob op
    n_sum, n_max = statistics_sizes(work.loss, work.nll_coef > 0)
    mp_group_role = "DP" if layout.distopt else "MP"
    samples = work.prompts_per_step * work.n_samples
    if rollout_bytes is None:
        rollout_bytes = samples * (shapes.s * 8 + 150)  # pickled token ids, log-probs, per-sample fields

    per_stage = []
    for stage in range(pp):
        params = stage_params(arch, layout, stage, work.make_vocab_size_divisible_by)
        dense, expert = [p for p in params if not p.expert], [p for p in params if p.expert]
        per_stage.append({
            "params": params, "expert": expert,
            "buffers": [(grad_buffer_numel(g, layout.distopt, size), role)
                        for g, role, size in ((dense, "DP", layout.dp), (expert, "EP", layout.edp)) if g],
            "norms": sum(p.local for p in params if (layout.sp and p.norm) or p.qk_norm),
            "gathers": gather_groups(params, layout, work.weight_sync_bucket_bytes, e),
            # the sync exports every expert of the layer (gathered from all EP ranks), not only local ones
            "buckets": sync_buckets([q for p in params for q in ([p] * layout.ep if p.expert else [p])],
                                    work.weight_sync_bucket_bytes, e),
        })

    def one_rank(rank: int) -> None:
        tp_rank, dp_rank, stage = rank_coords(rank, layout)
        first, last = stage == 0, stage == pp - 1
        layers = list(stage_layers(arch, pp, stage))
        moe = [i for i in layers if i in arch.moe_layers]
        mine = per_stage[stage]
        expert = mine["expert"]

        def forward(phase: str, n: int, training: bool) -> None:
            if tp > 1:
                if layout.sp:
                    dense_ops = {"all_gather": 2, "reduce_scatter": 2}
                    moe_ops = {"all_gather": 1, "reduce_scatter": 1}
                else:
                    dense_ops, moe_ops = {"all_reduce": 2}, {"all_reduce": 1}
                for op in set(dense_ops) | set(moe_ops):
                    k = dense_ops.get(op, 0) * (len(layers) - len(moe)) + moe_ops.get(op, 0) * len(moe)
                    add(rank, phase, "TP", op, act, n * k)
                if first:
                    add(rank, phase, "TP", "reduce_scatter" if layout.sp else "all_reduce", act, n)
                if last:
                    if layout.sp:
                        add(rank, phase, "TP", "all_gather", act, n)
                    add(rank, phase, "TP", "all_gather", tp * stat_bytes, n)
            if moe and training and work.moe_aux_loss != "none":
                group = tp if work.moe_aux_loss != "global_aux_loss" else tp * layout.dp
                if group > 1:
                    add(rank, phase, "TP" if group == tp else "world", "all_reduce", arch.num_experts * 8,
                        n * len(moe))
            moe_forward(phase, n)

        def moe_forward(phase: str, n: int) -> None:
            if not moe:
                return
            tokens = t // r * arch.topk
            if layout.ep > 1 or layout.etp > 1:
                add(rank, phase, "EP", "all_gather", layout.ep * layout.etp * arch.num_experts * 8, n * len(moe))
            if layout.ep > 1:
                add(rank, phase, "EP", "all_to_all", tokens * h * e, 2 * n * len(moe))  # dispatch, combine
                add(rank, phase, "EP", "all_to_all", tokens * 4, n * len(moe))  # routing probabilities
            if layout.etp > 1:
                add(rank, phase, "EP", "all_gather", layout.etp * tokens * h * e, n * len(moe))
                add(rank, phase, "EP", "all_gather", layout.etp * tokens * 4, n * len(moe))
                add(rank, phase, "EP", "reduce_scatter", layout.etp * tokens * h * e, n * len(moe))

        def backward(phase: str, n: int) -> None:
            if tp > 1:
                if layout.sp:
                    k_ag = 4 * (len(layers) - len(moe)) + 2 * len(moe)
                    k_rs = 2 * (len(layers) - len(moe)) + 1 * len(moe)
                    add(rank, phase, "TP", "all_gather", act, n * (k_ag + (1 if first else 0) + (1 if last else 0)))
                    add(rank, phase, "TP", "reduce_scatter", act, n * (k_rs + (1 if last else 0)))
                else:
                    k = 2 * (len(layers) - len(moe)) + len(moe)
                    add(rank, phase, "TP", "all_reduce", act, n * (k + (1 if last else 0)))
            if moe:
                tokens = t // r * arch.topk
                if layout.ep > 1:
                    add(rank, phase, "EP", "all_to_all", tokens * h * e, 2 * n * len(moe))
                    add(rank, phase, "EP", "all_to_all", tokens * 4, n * len(moe))
                if layout.etp > 1:
                    add(rank, phase, "EP", "all_gather", layout.etp * tokens * h * e, n * len(moe))
                    add(rank, phase, "EP", "reduce_scatter", layout.etp * tokens * h * e, n * len(moe))

        def pipeline(phase: str, n: int, forward_only: bool) -> None:
            calls = pipeline_p2p_calls(stage, pp, n, forward_only)
            if calls:
                add(rank, phase, "PP", "p2p", 0, len(calls))
                acc[(rank, phase, "PP", "p2p")][1] += sum(max(c) for c in calls) * (act // r)

        # the rollout, on every rank
        add(rank, "rollout_broadcast", "world", "broadcast_object", rollout_bytes)
        # old-policy pass: forward only
        forward("old_policy", shapes.old_policy, training=False)
        pipeline("old_policy", shapes.old_policy, forward_only=True)
        for n in shapes.updates:
            forward("forward_backward", n, training=True)
            backward("forward_backward", n)
            pipeline("forward_backward", n, forward_only=False)
            # finalize_model_grads, then the DDP reduction, at the end of the schedule
            if tp > 1 and mine["norms"]:
                add(rank, "forward_backward", "TP", "all_reduce", mine["norms"] * 4)
            if arch.tied and pp > 1 and (first or last):
                emb = arch.padded_vocab(tp, work.make_vocab_size_divisible_by) * h // tp
                add(rank, "forward_backward", "embedding", "all_reduce", emb * 4)
            for numel, role in mine["buffers"]:
                if layout.distopt:
                    add(rank, "forward_backward", role, "reduce_scatter", numel * 4)
                    # megatron-core 0.16 chains one DistributedOptimizer per buffer kind (dense, expert),
                    # and each one's step_with_ready_grads calls start_param_sync of the whole model
                    # chunk: every buffer is all-gathered once per chained optimizer
                    add(rank, "optimizer", role, "all_gather", numel * e, len(mine["buffers"]))
                else:
                    add(rank, "forward_backward", role, "all_reduce", numel * 4)
            add(rank, "statistics", "statistics", "all_reduce", n_sum * 8)
            add(rank, "statistics", "statistics", "all_reduce", n_max * 8)
            if work.params_dtype == "float16":
                add(rank, "optimizer", mp_group_role, "all_reduce", 4)  # found_inf
            if work.clip_grad > 0:
                add(rank, "optimizer", mp_group_role, "all_reduce", 4)

        # weight sync (destination "rank0")
        elem = e
        # expert_gather: expert DP replica 0 (every EP rank of it) gathers each MoE layer's experts to EP
        # rank 0, one gather per layer; the gloo gather counts the gathered rows at the root
        ep_rank, edp_rank = dp_rank % layout.ep, dp_rank // layout.ep
        if moe and layout.ep > 1 and edp_rank == 0:
            local = count(expert) * elem // len(moe)
            add(rank, "weight_sync", "EP", "gather", local * layout.ep if ep_rank == 0 else local, len(moe))
        if dp_rank == 0:
            for shard in mine["gathers"]:
                if tp > 1 and shard:
                    if work.backend == "gloo":
                        add(rank, "weight_sync", "TP", "gather", shard * tp if tp_rank == 0 else shard)
                    else:
                        add(rank, "weight_sync", "TP", "all_gather", shard * tp)
            if tp_rank == 0 and pp > 1 and work.sync_destination == "rank0":
                if stage > 0:
                    for b in mine["buckets"]:
                        add(rank, "weight_sync", "PP", "p2p", b)
                elif rank == 0:
                    for later in per_stage[1:]:
                        for b in later["buckets"]:
                            add(rank, "weight_sync", "PP", "p2p", b)
        if rank == 0 and work.sync_destination == "rank0":
            for st in per_stage:
                for b in st["buckets"]:
                    add(rank, "weight_sync", "weight-sync", "broadcast", b)
        elif work.sync_destination == "stage" and tp_rank == 0 and dp_rank == 0:
            for b in mine["buckets"]:
                add(rank, "weight_sync", "weight-sync", "broadcast", b)
        add(rank, "weight_sync", "world", "broadcast_object", 200)

    for rank in range(layout.world):
        one_rank(rank)
    return [Event(k[0], k[1], k[2], k[3], v[0], v[1]) for k, v in sorted(acc.items())]


def totals(events: Iterable[Event], keys: tuple[str, ...] = ("role",)) -> dict[tuple, dict[str, int]]:
    """{key tuple: {"count", "bytes"}} summed over everything else (ranks included)."""
    out: dict[tuple, dict[str, int]] = {}
    for ev in events:
        k = tuple(getattr(ev, name) for name in keys)
        slot = out.setdefault(k, {"count": 0, "bytes": 0})
        slot["count"] += ev.count
        slot["bytes"] += ev.bytes
    return out


def measured_events(profile: dict) -> list[Event]:
    """The recorder's events of a comm_profile.json, in the same form (op families, one step)."""
    acc: dict[tuple[int, str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in profile["ranks"]:
        for ev in r["events"]:
            slot = acc[(r["rank"], ev["phase"], ev["role"], op_family(ev["op"]))]
            slot[0] += 1
            slot[1] += ev["bytes"]
    return [Event(k[0], k[1], k[2], k[3], v[0], v[1]) for k, v in sorted(acc.items())]


def shapes_from_profile(profile: dict, rank: int = 0) -> StepShapes:
    """The micro-batch shapes and counts a profiled step actually ran (its phases' attrs)."""
    step = next(r for r in profile["ranks"] if r["rank"] == rank)["steps"][0]
    (old,) = step["phases"]["old_policy"]["attrs"]
    updates = step["phases"]["forward_backward"]["attrs"]
    b, s = old["micro_batch_shape"]
    return StepShapes(b=b, s=s, old_policy=old["micro_batches"], updates=tuple(a["micro_batches"] for a in updates))
