"""Phase 5: the step's metrics (rank 0: metrics.jsonl, TensorBoard, a progress line) and checkpoints."""
from __future__ import annotations

import time

from erc_megatron.train.checkpoint import save_checkpoint
from erc_megatron.train.metrics_log import progress_line
from erc_megatron.train.phases.collect import validation
from erc_megatron.train.run import LoopState, Run
from erc_megatron.utils import console


def log_checkpoint(run: Run, state: LoopState, metrics: dict[str, float]) -> None:
    """After step `state.step` (counted from 1): log, and save every `trainer.save_every` steps and at the end."""
    cfg, done = run.cfg, state.step
    if run.rank0 is not None:
        run.rank0.logger.log(done, metrics)
        per_step = (time.monotonic() - state.run_start) / (done - state.run_start_step)
        print(f"{progress_line(done, cfg.trainer.steps, metrics)} | ETA "
              f"{console.format_seconds(per_step * (cfg.trainer.steps - done))}", flush=True)
    if (cfg.trainer.save_every and done % cfg.trainer.save_every == 0) or done == cfg.trainer.steps:
        data = run.rank0.iterator.state_dict() if run.rank0 is not None else None
        save_checkpoint(cfg.trainer.run_dir, done, run.learner, {"weight_version": state.weight_version, "data": data})
    state.last_metrics = metrics


def final_validation(run: Run, state: LoopState) -> dict[str, float]:
    """After the last step (rank 0, when validation is on): logged with `final: 1`; returns the metrics."""
    if run.rank0 is None or run.rank0.val_set is None or not run.cfg.validation.every_steps:
        return {}
    val = validation(run, state, "final validation")
    run.rank0.logger.log(run.cfg.trainer.steps, {**val, "final": 1.0})
    console.say("final validation: " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
    return val
