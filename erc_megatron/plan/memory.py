"""Per-rank memory of the learner during an update: parameters, gradients, optimizer state,
activations and the logits path. Pure functions; bytes.

What megatron-core holds, as this project configures it (train/learner.py):
- parameters in `params_dtype`; gradients in one fp32 buffer (`grad_reduce_in_fp32=True`);
- Adam: fp32 main parameters (only when params are 16-bit) plus exp_avg and exp_avg_sq in fp32,
  i.e. 12 bytes per parameter with bf16 (8 with fp32). The distributed optimizer (ZeRO-1) shards
  these over the data-parallel group (expert parameters: over the expert data-parallel group);
  parameters and the gradient buffer stay whole on every rank (megatron's "6 + 12/d" bytes per
  parameter with bf16).
- activations of one micro-batch per layer, for the micro-batches in flight under 1F1B (pipeline
  stage k keeps min(pp - k, m) of them), reduced by sequence parallelism and recomputation;
- on the last stage, the vocabulary-parallel logits path of erc_megatron/ops: the [tokens, V/tp]
  logits and their gradient, plus fp32 temporaries bounded by `logits.chunk_size`; with
  `logits.fused_output_layer` the logits are never materialised and only a chunk's temporaries
  remain.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from erc_megatron.plan.inputs import Arch, Layout, StepShapes, Workload
from erc_megatron.plan.params import count, stage_layers, stage_params

GRAD_BYTES = 4  # grad_reduce_in_fp32
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one rank (the busiest pipeline stage)."""

    stage: int
    params: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    reserve: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.logits + self.reserve

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def optimizer_bytes_per_param(params_dtype_bytes: int) -> int:
    return (4 if params_dtype_bytes < 4 else 0) + ADAM_STATE_BYTES


def model_state_bytes(arch: Arch, layout: Layout, work: Workload, stage: int,
                      rank: int | None = None) -> tuple[int, int, int]:
    """(parameters, gradient buffer, optimizer state) bytes on one rank of `stage`: global `rank`
    for the exact shard of the distributed optimizer, None for the largest shard."""
    from erc_megatron.plan.comm import distopt_shard_numel, grad_buffer_numel

    ps = stage_params(arch, layout, stage, work.make_vocab_size_divisible_by)
    dense_p, expert_p = [p for p in ps if not p.expert], [p for p in ps if p.expert]
    dense, expert = count(dense_p), count(expert_p)
    per = optimizer_bytes_per_param(work.param_bytes)
    if layout.distopt:
        shards = 0
        for group, size, index in ((dense_p, layout.dp, (rank // layout.tp) % layout.dp if rank is not None else None),
                                   (expert_p, layout.edp,
                                    (rank // (layout.etp * layout.ep)) % layout.edp if rank is not None else None)):
            if not group:
                continue
            if index is None:
                shards += max(distopt_shard_numel(group, size, r) for r in range(size))
            else:
                shards += distopt_shard_numel(group, size, index)
        opt = shards * per
    else:
        opt = (dense + expert) * per
    # the gradient buffer holds the padding too (distributed optimizer)
    grads = sum(grad_buffer_numel(g, layout.distopt, size)
                for g, size in ((dense_p, layout.dp), (expert_p, layout.edp)))
    return (dense + expert) * work.param_bytes, grads * GRAD_BYTES, opt


def layer_activation_bytes(arch: Arch, layout: Layout, work: Workload, tokens: int, seq: int, moe: bool,
                           flash_attention: bool = True) -> int:
    """Bytes autograd keeps for one layer and one micro-batch of `tokens` tokens (sequences of `seq`)."""
    e, tp = work.param_bytes, layout.tp
    r = tp if layout.sp else 1  # [tokens, hidden] tensors are sequence-sharded under SP
    h, q, kv = arch.hidden, arch.heads * arch.head_dim, arch.groups * arch.head_dim
    attn = 2 * tokens * h * e // r  # norm input, qkv input
    attn += tokens * (q + 2 * kv) * e // tp  # q, k, v
    attn += tokens * q * e // tp  # attention output = projection input
    if flash_attention or layout.recompute == "selective":
        attn += tokens * arch.heads // tp * 4  # softmax statistics
    else:  # unfused (local spec): the softmax output [b, heads, s, s]
        attn += tokens * seq * arch.heads * e // tp
    if moe:
        k, f = arch.topk, arch.moe_ffn
        mlp = 2 * tokens * h * e // r + 2 * tokens * arch.num_experts * 4 // r  # norm in, router in, logits, probs
        mlp += 3 * tokens * k * h * e // r  # permuted tokens, received tokens, combined tokens
        mlp += 3 * tokens * k * f * e // (r * layout.etp)  # fc1 output (gate, up), activation output
    else:
        mlp = 2 * tokens * h * e // r + 3 * tokens * arch.ffn * e // tp
    return attn + mlp


def activation_bytes(arch: Arch, layout: Layout, work: Workload, shapes: StepShapes, stage: int,
                     flash_attention: bool = True) -> int:
    """Activations one rank of `stage` holds at its peak of an update (1F1B)."""
    m = max(shapes.updates) if shapes.updates else 0
    in_flight = min(layout.pp - stage, m)
    if in_flight == 0:
        return 0
    t, e = shapes.tokens, work.param_bytes
    r = layout.tp if layout.sp else 1
    layers = list(stage_layers(arch, layout.pp, stage))
    full = [layer_activation_bytes(arch, layout, work, t, shapes.s, i in arch.moe_layers, flash_attention)
            for i in layers]
    boundary = t * arch.hidden * e // r  # a layer's input, all a recomputed layer keeps
    if layout.recompute == "full":
        n = layout.recompute_num_layers or 1
        if layout.recompute_method == "block":
            kept = sum(boundary if j < n else a for j, a in enumerate(full))
            live = max(full[:n], default=0)
        else:  # uniform: groups of n layers keep their first input; one group is live in backward
            kept = boundary * -(-len(full) // n)
            live = sum(sorted(full)[-n:])
        return in_flight * kept + live
    return in_flight * (sum(full) + boundary)


def logits_bytes(arch: Arch, layout: Layout, work: Workload, shapes: StepShapes) -> int:
    """The last stage's log-prob/entropy path for one micro-batch (1F1B runs one at a time there)."""
    t = shapes.tokens
    v = arch.padded_vocab(layout.tp, work.make_vocab_size_divisible_by) // layout.tp
    chunk = min(work.chunk_size or t, t)
    temporaries = 3 * chunk * v * 4  # fp32 chunk of logits, its softmax, its gradient
    if work.fused_output_layer:
        return temporaries
    return 2 * t * v * work.param_bytes + temporaries  # logits and their gradient


def rank_memory(arch: Arch, layout: Layout, work: Workload, shapes: StepShapes, reserve_bytes: int = 0,
                flash_attention: bool = True) -> MemoryBreakdown:
    """Memory of the busiest rank: every pipeline stage is evaluated, the largest total is returned."""
    best: MemoryBreakdown | None = None
    for stage in range(layout.pp):
        p, g, o = model_state_bytes(arch, layout, work, stage)
        a = activation_bytes(arch, layout, work, shapes, stage, flash_attention)
        lg = logits_bytes(arch, layout, work, shapes) if stage == layout.pp - 1 else 0
        mb = MemoryBreakdown(stage, p, g, o, a, lg, reserve_bytes)
        if best is None or mb.total > best.total:
            best = mb
    assert best is not None
    return best
