"""Phase 1: rollout -> rewards -> group advantages on rank 0, then each data-parallel rank's share of the step."""
from __future__ import annotations

from erc_megatron.algo import set_group_advantages
from erc_megatron.comm import comm_phase
from erc_megatron.rollout.collect import Sample, collect_step, validate
from erc_megatron.train.rollout_share import StepShare
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


def collect(run: Run, state: LoopState, step: int) -> tuple[StepShare | None, dict[str, float]]:
    """This rank's share of the step's kept groups (advantages set; None when no group was kept)
    and the rollout metrics.

    `step` counts from 0. The collectives here are the rollout hand-off (erc_megatron.train.rollout_share:
    a small header, the [samples, 4] table of lengths / rewards / advantages, then each data-parallel
    rank's token ids scattered to it; a failure on rank 0 stops every rank with its message).
    """
    with comm_phase("rollout_broadcast"):
        return run.sharer.share(lambda: _rollout_on_rank0(run, state, step))
