"""The planner's output: a table on the console and a JSON document."""
from __future__ import annotations

from erc_megatron.plan.comm import Event, totals
from erc_megatron.plan.inputs import Arch, Workload
from erc_megatron.plan.params import active_params, total_params
from erc_megatron.plan.search import Candidate, Hardware

GB = 1e9


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def comm_rows(events: list[Event]) -> list[dict]:
    """Per (role, op): calls and bytes per step summed over ranks, and the busiest rank's bytes."""
    summed = totals(events, ("role", "op"))
    per_rank = totals(events, ("role", "op", "rank"))
    rows = []
    for (role, op), v in sorted(summed.items()):
        busiest = max(b["bytes"] for (r, o, _), b in per_rank.items() if (r, o) == (role, op))
        rows.append({"role": role, "op": op, "count": v["count"], "bytes": v["bytes"], "max_rank_bytes": busiest})
    return rows


def memory_table(cands: list[Candidate], hw: Hardware) -> str:
    head = (f"{'#':>3}  {'layout':<44} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'logits':>8} "
            f"{'total':>8}  {'step s':>7}")
    lines = [head, "-" * len(head)]
    for i, c in enumerate(cands, 1):
        m = c.memory
        lines.append(f"{i:>3}  {c.layout.label:<44} " + " ".join(
            f"{x / GB:>8.1f}" for x in (m.params, m.grads, m.optimizer, m.activations, m.logits, m.total))
            + f"  {c.seconds:>7.1f}")
    lines.append(f"(GB per rank on the busiest pipeline stage, {hw.reserve_bytes / 2**30:.0f} GiB reserve included "
                 f"in total; GPU {hw.gpu_memory_bytes / GB:.0f} GB)")
    return "\n".join(lines)


def comm_table(events: list[Event]) -> str:
    head = f"{'group':<12} {'op':<17} {'calls':>7} {'bytes (all ranks)':>18} {'busiest rank':>13}"
    lines = [head, "-" * len(head)]
    for row in comm_rows(events):
        lines.append(f"{row['role']:<12} {row['op']:<17} {row['count']:>7} {fmt_bytes(row['bytes']):>18} "
                     f"{fmt_bytes(row['max_rank_bytes']):>13}")
    return "\n".join(lines)


def to_json(arch: Arch, work: Workload, hw: Hardware, cands: list[Candidate], recipe_layout: Candidate | None,
            source: str) -> dict:
    def cand(c: Candidate) -> dict:
        lay = c.layout
        return {"layout": {"tensor_model_parallel_size": lay.tp, "pipeline_model_parallel_size": lay.pp,
                           "data_parallel_size": lay.dp, "expert_model_parallel_size": lay.ep,
                           "expert_tensor_parallel_size": lay.etp, "use_distributed_optimizer": lay.distopt,
                           "sequence_parallel": lay.sp, "recompute_granularity": lay.recompute},
                "label": lay.label, "fits": c.fits, "estimated_step_seconds": c.seconds,
                "memory_bytes": c.memory.to_dict(), "collectives_per_step": comm_rows(c.events)}

    return {
        "model": {"name": arch.name, "source": source, "total_params": total_params(arch),
                  "active_params": active_params(arch), "num_experts": arch.num_experts},
        "hardware": {"gpus": hw.gpus, "gpu_memory_bytes": hw.gpu_memory_bytes, "gpus_per_node": hw.gpus_per_node,
                     "reserve_bytes": hw.reserve_bytes},
        "workload": {"params_dtype": work.params_dtype, "micro_batch_size": work.micro_batch_size,
                     "seq_length": work.seq_length, "max_tokens_per_micro_batch": work.max_tokens_per_micro_batch,
                     "prompts_per_step": work.prompts_per_step, "prompts_per_minibatch": work.prompts_per_minibatch,
                     "n_samples_per_prompt": work.n_samples},
        "ranking": "estimated learner seconds per step, lowest first (erc_megatron.plan.search)",
        "recipe_layout": cand(recipe_layout) if recipe_layout else None,
        "layouts": [cand(c) for c in cands],
    }
