"""Phase 1: rollout -> rewards -> group advantages on rank 0, then the step's groups to every rank."""
from __future__ import annotations

from erc_megatron.algo import set_group_advantages
from erc_megatron.comm import comm_phase
from erc_megatron.rollout.collect import Sample, collect_step, validate
from erc_megatron.train.rank0 import on_rank0
from erc_megatron.train.run import LoopState, Run, timed


def validation(run: Run, state: LoopState, label: str) -> dict[str, float]:
    """avg@k on the validation prompts (rank 0 only; {} without them)."""
    r0 = run.rank0
    if r0 is None or r0.val_set is None:
        return {}
    return timed(state, "validation", label, lambda p: validate(r0.client, r0.val_set, run.cfg, r0.reward_fn))


def _rollout_on_rank0(run: Run, state: LoopState, step: int) -> tuple[list[list[Sample]], dict[str, float]]:
    cfg, r0 = run.cfg, run.rank0
    metrics: dict[str, float] = {}
    with comm_phase("rollout"):
        every = cfg.validation.every_steps
        if every and step % every == 0:
            metrics.update(validation(run, state, f"validation before step {step + 1}"))
        groups, rollout_metrics = timed(
            state, "rollout", f"rollout step {step + 1}/{cfg.trainer.steps}",
            lambda p: collect_step(r0.client, r0.iterator, cfg, r0.reward_fn, step, progress=p.update),
            total=cfg.trainer.prompts_per_step, unit="groups")
        set_group_advantages(groups)
    return groups, {**metrics, **rollout_metrics}


def collect(run: Run, state: LoopState, step: int) -> tuple[list[list[Sample]], dict[str, float]]:
    """The step's kept groups (advantages set) and rollout metrics, the same on every rank.

    `step` counts from 0. The one collective here is the rollout broadcast (`on_rank0`: rank 0's
    groups, pickled, to every rank; a failure on rank 0 stops every rank with its message).
    """
    with comm_phase("rollout_broadcast"):
        return on_rank0(lambda: _rollout_on_rank0(run, state, step))
