"""What one training run holds: the parts built at start-up (`Run`) and what changes from step to step
(`LoopState`), passed explicitly to each phase of erc_megatron.train.phases.

`start_run` builds the learner side (distributed start-up, the model from a checkpoint or model.path);
`start_rollout` then the rollout side (on rank 0 the data, the reward function, the metrics log and
the rollout servers; on every rank the weight sync and the communication profiler); `close_run`
stops what rank 0 started.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from erc_megatron.utils import console


@dataclass
class Rank0Parts:
    """What only rank 0 holds: it drives the rollout servers and writes the logs."""

    client: Any  # erc_megatron.rollout.client.SGLangClient
    servers: Any  # the embedded servers it started (closed at the end), or a no-op handle
    iterator: Any  # erc_megatron.data.prompts.PromptIterator over the training prompts
    val_set: Any  # validation prompts, or None without data.val_path
    reward_fn: Any
    logger: Any  # erc_megatron.train.metrics_log.MetricsLogger


@dataclass
class Run:
    """Built once at start-up, the same for every step."""

    cfg: Any  # erc_megatron.train.config.RunConfig
    model_cfg: Any  # erc_megatron.model.config.ModelConfig
    layout: Any  # erc_megatron.dist.ParallelLayout: this rank's process groups (layout.launch: the launcher's view)
    learner: Any  # erc_megatron.train.learner.Learner
    tokenizer: Any
    pad_id: int
    rank: int
    rank0: Rank0Parts | None = None  # None on every other rank
    sync: Any = None  # erc_megatron.sync.weight_sync.WeightSync
    profiler: Any = None  # erc_megatron.comm.profiler.CommProfiler or NullProfiler
    sharer: Any = None  # erc_megatron.train.rollout_share.RolloutShare: rank 0's rollout to each DP rank's share


@dataclass
class LoopState:
    """What a step changes; `step` and `weight_version` (with the data iterator) go into checkpoints."""

    step: int  # steps done
    weight_version: int  # weight versions sent to the rollout servers
    resumed_from: str | None = None  # the checkpoint folder, or None for a fresh start
    data_state: dict | None = None  # the prompt iterator's position saved with that checkpoint
    run_start: float = field(default_factory=time.monotonic)
    run_start_step: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # phase -> last duration, for its next ETA
    last_metrics: dict[str, float] = field(default_factory=dict)


def timed(state: LoopState, phase: str, label: str, fn, **progress_kw):
    """`fn(progress)` under a progress line whose ETA is the phase's previous duration."""
    with console.Progress(label, expected_s=state.phase_seconds.get(phase), **progress_kw) as p:
        out = fn(p)
    state.phase_seconds[phase] = p.elapsed
    return out


def start_run(cfg) -> tuple[Run, LoopState]:
    """Distributed start-up and the learner with its weights (from the latest checkpoint or model.path)."""
    from transformers import AutoConfig, AutoTokenizer

    from erc_megatron.dist import init_distributed
    from erc_megatron.model.config import ModelConfig
    from erc_megatron.model.moe import moe_overrides
    from erc_megatron.train.checkpoint import latest_checkpoint, load_checkpoint
    from erc_megatron.train.learner import build_learner
    from erc_megatron.weights.checkpoint_io import load_hf_checkpoint

    hf_config = AutoConfig.from_pretrained(cfg.model.path)
    model_cfg = ModelConfig.from_hf_config(hf_config,
                                           make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
                                           params_dtype=cfg.model.params_dtype, **moe_overrides(cfg.model, hf_config),
                                           recompute_granularity=cfg.model.recompute_granularity,
                                           recompute_method=cfg.model.recompute_method,
                                           recompute_num_layers=cfg.model.recompute_num_layers)
    layout = init_distributed(cfg.parallel, model_cfg)
    console.say(console.environment_line(
        backend=dist.get_backend(), device="GPU" if torch.cuda.is_available() else "CPU",
        world_size=layout.world_size, launcher=layout.launch.launcher, tp=layout.tp.size, pp=layout.pp.size,
        dp=layout.dp.size, cp=layout.cp.size, ep=layout.ep.size,
        versions=console.runtime_versions(), absent=console.absent_parts()))
    with console.Progress(f"building the model ({model_cfg.num_layers} layers)"):
        learner = build_learner(model_cfg, cfg.optim, cfg.parallel, layout=layout)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    run = Run(cfg=cfg, model_cfg=model_cfg, layout=layout, learner=learner, tokenizer=tokenizer, pad_id=pad_id,
              rank=layout.rank)

    ckpt = latest_checkpoint(cfg.trainer.run_dir) if cfg.trainer.resume else None
    if ckpt is not None:
        saved = load_checkpoint(ckpt, learner)
        state = LoopState(step=saved["step"], weight_version=saved["weight_version"], resumed_from=str(ckpt),
                          data_state=saved["data"])
        console.say(f"resumed from {ckpt} at step {state.step}")
    else:
        state = LoopState(step=0, weight_version=0)
        with console.Progress(f"loading {cfg.model.path}"):
            load_hf_checkpoint(learner.unwrapped, cfg.model.path, model_cfg, layout=layout)
        # bf16/fp16: the optimizer keeps fp32 master copies made before the load
        learner.optimizer.reload_model_params()
    state.run_start_step = state.step
    return run, state


def _start_rank0_parts(run: Run, state: LoopState) -> None:
    from erc_megatron.data.prompts import PromptIterator, load_prompt_dataset
    from erc_megatron.reward.registry import load_reward_fn
    from erc_megatron.sync.weight_sync import start_rollout_servers
    from erc_megatron.train.metrics_log import MetricsLogger

    cfg = run.cfg
    train_set = load_prompt_dataset(cfg.data.train_path, cfg.data, run.tokenizer)
    val_set = load_prompt_dataset(cfg.data.val_path, cfg.data, run.tokenizer) if cfg.data.val_path else None
    iterator = PromptIterator.from_config(train_set, cfg.data)
    if state.data_state:
        iterator.load_state_dict(state.data_state)
    reward_fn = load_reward_fn(cfg.reward.fn, cfg.reward.kwargs)
    logger = MetricsLogger(cfg.trainer.run_dir, resume_step=state.step)
    # assigned before the servers start, so close_run closes the logger if they fail to
    run.rank0 = Rank0Parts(client=None, servers=None, iterator=iterator, val_set=val_set, reward_fn=reward_fn,
                           logger=logger)
    run.rank0.servers, run.rank0.client = start_rollout_servers(cfg, log_dir=cfg.trainer.run_dir)
    console.say(f"{len(train_set)} train prompts, {len(val_set) if val_set else 0} validation prompts; "
                f"rollout servers {run.rank0.client.urls}")


def start_rollout(run: Run, state: LoopState) -> None:
    """Rank 0's rollout side (every rank raises if it fails), the weight sync and the comm profiler.

    After a resume the servers hold model.path's weights, so the learner's are sent first.
    """
    from erc_megatron.comm import start_comm_profiler
    from erc_megatron.sync.weight_sync import WeightSync
    from erc_megatron.train.rank0 import on_rank0

    from erc_megatron.train.rollout_share import rollout_share

    cfg = run.cfg
    on_rank0(lambda: _start_rank0_parts(run, state))
    run.sharer = rollout_share(cfg.trainer, run.layout.dp.rank, run.layout.dp.size)
    client = run.rank0.client if run.rank0 is not None else None
    run.sync = WeightSync(run.learner, run.model_cfg, client, cfg.rollout.weight_sync_bucket_mb * 2**20,
                          mode=cfg.rollout.weight_sync_mode)
    roles = dict.fromkeys(run.sync.group_names, "weight-sync")
    run.profiler = start_comm_profiler(cfg.trainer.run_dir, cfg.trainer.profile_comm, cfg.trainer.profile_steps,
                                       cfg.trainer.steps, extra_roles=roles, say=console.say)
    if state.resumed_from is not None:
        run.sync.sync(state.weight_version)


def close_run(run: Run) -> None:
    """Close rank 0's metrics log and stop the rollout servers it started (also after a failure)."""
    if run.rank0 is None:
        return
    if run.rank0.logger is not None:
        run.rank0.logger.close()
    if run.rank0.servers is not None:
        run.rank0.servers.close()
