"""`erc-megatron train --config examples/<recipe>.yaml [section.key=value ...]` (under torchrun/srun).

One RL step reads like the algorithm:
    rollout (rank 0, over SGLang's HTTP API) -> rewards -> group advantages with dynamic sampling
    -> broadcast to every rank -> old-policy pass (old_logp, H_old) -> mini-batch updates with ERC
    -> weight sync to the rollout servers -> metrics / validation / checkpoint.
Rank 0 drives the rollout servers; when `rollout.server_urls` is empty it starts the embedded CPU
server itself (same protocol as SGLang, same code path).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

log = logging.getLogger("erc_megatron.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from erc_megatron.train.config import RunConfig
    from erc_megatron.utils.config_docs import describe

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "config fields (YAML section.key, or a section.key=value override):\n" + "\n".join(
        "  " + line for line in describe(RunConfig))
    parser.add_argument("--config", required=True, help="recipe YAML (see examples/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. trainer.steps=10")


def _say(msg: str) -> None:
    from erc_megatron.utils.console import say

    say(msg)


def _broadcast(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(fn):
    """Run `fn` on rank 0 and hand its result to every rank.

    If it raises (a rollout server died, a reward function failed), every rank raises with rank 0's
    message: otherwise the others would sit in the broadcast until rank 0's exit closes the
    connections, and the launcher would report their "connection closed" as the root cause.
    """
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = exc
    result, message = _broadcast((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed, stopping: {message}")
    return result


def _mean_metrics(per_update: list[dict[str, float]]) -> dict[str, float]:
    import math

    out: dict[str, float] = {}
    for key in per_update[0] if per_update else []:
        vals = [m[key] for m in per_update if isinstance(m.get(key), float) and math.isfinite(m[key])]
        if key.endswith("_max"):
            out[key] = max(vals) if vals else float("nan")
        elif key.endswith("_min"):
            out[key] = min(vals) if vals else float("nan")
        elif key in ("pg/tokens", "pg/seqs", "skipped", "updated"):
            out[key] = float(sum(vals))
        else:
            out[key] = sum(vals) / len(vals) if vals else float("nan")
    return out


def train(cfg) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from erc_megatron.comm import comm_phase, start_comm_profiler
    from erc_megatron.data.prompts import PromptIterator, load_prompt_dataset
    from erc_megatron.dist import init_distributed
    from erc_megatron.model.config import ModelConfig
    from erc_megatron.reward.registry import load_reward_fn
    from erc_megatron.rollout.collect import collect_step, validate
    from erc_megatron.sync.weight_sync import WeightSync, start_rollout_servers
    from erc_megatron.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from erc_megatron.train.learner import build_learner
    from erc_megatron.train.metrics_log import MetricsLogger, progress_line
    from erc_megatron.train.minibatch import split_minibatches, step_seq_length
    from erc_megatron.train.step import old_policy_pass
    from erc_megatron.train.update import minibatch_denominators, update_policy
    from erc_megatron.weights.checkpoint_io import load_hf_checkpoint

    from erc_megatron.model.moe import moe_overrides
    from erc_megatron.model.moe_metrics import RouterStats

    hf_config = AutoConfig.from_pretrained(cfg.model.path)
    model_cfg = ModelConfig.from_hf_config(hf_config,
                                           make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
                                           params_dtype=cfg.model.params_dtype, **moe_overrides(cfg.model, hf_config))
    launch = init_distributed(cfg.parallel, model_cfg)
    from megatron.core import parallel_state as ps

    from erc_megatron.utils import console

    rank = dist.get_rank()
    _say(console.environment_line(
        backend=dist.get_backend(), device="GPU" if torch.cuda.is_available() else "CPU",
        world_size=dist.get_world_size(), launcher=launch.launcher, tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(), ep=ps.get_expert_model_parallel_world_size(),
        versions=console.runtime_versions(), absent=console.absent_parts()))
    with console.Progress(f"building the model ({model_cfg.num_layers} layers)"):
        learner = build_learner(model_cfg, cfg.optim)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    run_dir = cfg.trainer.run_dir

    start_step, weight_version, data_state = 0, 0, None
    ckpt = latest_checkpoint(run_dir) if cfg.trainer.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, learner)
        start_step, weight_version, data_state = state["step"], state["weight_version"], state["data"]
        _say(f"resumed from {ckpt} at step {start_step}")
    else:
        with console.Progress(f"loading {cfg.model.path}"):
            load_hf_checkpoint(learner.unwrapped, cfg.model.path, model_cfg)
        # bf16/fp16: the optimizer keeps fp32 master copies made before the load
        learner.optimizer.reload_model_params()

    servers = client = iterator = val_set = reward_fn = logger = None

    def setup_rank0() -> None:
        nonlocal servers, client, iterator, val_set, reward_fn, logger
        train_set = load_prompt_dataset(cfg.data.train_path, cfg.data, tokenizer)
        val_set = load_prompt_dataset(cfg.data.val_path, cfg.data, tokenizer) if cfg.data.val_path else None
        iterator = PromptIterator.from_config(train_set, cfg.data)
        if data_state:
            iterator.load_state_dict(data_state)
        reward_fn = load_reward_fn(cfg.reward.fn, cfg.reward.kwargs)
        logger = MetricsLogger(run_dir, resume_step=start_step)
        servers, client = start_rollout_servers(cfg, log_dir=run_dir)
        _say(f"{len(train_set)} train prompts, {len(val_set) if val_set else 0} validation prompts; "
             f"rollout servers {client.urls}")

    try:
        _on_rank0(setup_rank0)
        sync = WeightSync(learner, model_cfg, client, cfg.rollout.weight_sync_bucket_mb * 2**20,
                          mode=cfg.rollout.weight_sync_mode)
        profiler = start_comm_profiler(run_dir, cfg.trainer.profile_comm, cfg.trainer.profile_steps, cfg.trainer.steps,
                                       extra_roles={sync.group_name: "weight-sync"}, say=_say)
        # the servers load model.path; after a resume they must get the learner's weights first
        if ckpt is not None:
            sync.sync(weight_version)
        dp = ps.get_data_parallel_world_size()
        _say(f"training steps {start_step + 1}..{cfg.trainer.steps} ({launch.world_size} ranks started by "
             f"{launch.launcher}, rendezvous {launch.master_addr}:{launch.master_port})")
        every = cfg.validation.every_steps

        def learn(groups, metrics: dict[str, float], weight_version: int) -> int:
            """Old-policy pass -> mini-batch updates -> weight sync; adds their metrics, returns the new version."""
            t0 = time.perf_counter()
            seq_len = step_seq_length(groups)
            minibatches = split_minibatches(groups, cfg.trainer.prompts_per_minibatch, ps.get_data_parallel_rank(),
                                            dp, cfg.trainer.micro_batch_size, pad_id, seq_len)
            flat = [mb for m in minibatches for mb in m.mine]
            with comm_phase("old_policy", micro_batches=len(flat), micro_batch_shape=list(flat[0].tokens.shape)):
                with_old = old_policy_pass(learner.model, flat, model_cfg.vocab_size, cfg.logits)
            i = 0
            for m in minibatches:
                m.mine = with_old[i:i + len(m.mine)]
                i += len(m.mine)
            metrics["time/old_policy"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            updates = []
            routers = RouterStats(learner.model, model_cfg.num_layers, model_cfg.num_moe_experts,
                                  model_cfg.moe_router_topk) if model_cfg.is_moe else contextlib.nullcontext()
            with routers:
                for m in minibatches:
                    den = minibatch_denominators(m.everyone, cfg.loss.agg, cfg.trainer.nll_coef > 0)
                    updates.append(update_policy(learner, m.mine, den, cfg.loss, cfg.logits, cfg.trainer.nll_coef))
            metrics.update(_mean_metrics(updates))
            if model_cfg.is_moe:  # router load balance over the update's forward passes
                metrics.update(routers.summarise())
            metrics["time/update"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            weight_version += 1
            with comm_phase("weight_sync"):
                sync.sync(weight_version)
            metrics["time/weight_sync"] = time.perf_counter() - t0
            metrics["weight_version"] = float(weight_version)
            return weight_version

        final: dict = {}
        last: dict[str, float] = {}  # phase -> seconds it took last time, for the ETA of the next one
        run_start, run_start_step = time.monotonic(), start_step

        def timed(phase: str, label: str, fn, **kw):
            with console.Progress(label, expected_s=last.get(phase), **kw) as p:
                out = fn(p)
            last[phase] = p.elapsed
            return out

        for step in range(start_step, cfg.trainer.steps):
            profiler.begin_step(step + 1)

            def rollout_on_rank0():
                out: dict[str, float] = {}
                with comm_phase("rollout"):
                    if val_set is not None and every and step % every == 0:
                        out.update(timed("validation", f"validation before step {step + 1}",
                                         lambda p: validate(client, val_set, cfg, reward_fn)))
                    groups, rollout_metrics = timed(
                        "rollout", f"rollout step {step + 1}/{cfg.trainer.steps}",
                        lambda p: collect_step(client, iterator, cfg, reward_fn, step, progress=p.update),
                        total=cfg.trainer.prompts_per_step, unit="groups")
                return groups, {**out, **rollout_metrics}

            with comm_phase("rollout_broadcast"):
                groups, metrics = _on_rank0(rollout_on_rank0)
            done = step + 1
            if groups:
                weight_version = learn(groups, metrics, weight_version)
            else:
                # still logged and checkpointed: the step consumed its prompts
                _say(f"step {done}: no informative groups (all rewards equal in every group); skipping update")
            profiler.end_step()
            if rank == 0:
                logger.log(done, metrics)
                per_step = (time.monotonic() - run_start) / (done - run_start_step)
                print(f"{progress_line(done, cfg.trainer.steps, metrics)} | ETA "
                      f"{console.format_seconds(per_step * (cfg.trainer.steps - done))}", flush=True)
            if (cfg.trainer.save_every and done % cfg.trainer.save_every == 0) or done == cfg.trainer.steps:
                state = {"weight_version": weight_version, "data": iterator.state_dict() if rank == 0 else None}
                save_checkpoint(run_dir, done, learner, state)
            final = metrics
        if rank == 0 and val_set is not None and every:
            val = timed("validation", "final validation", lambda p: validate(client, val_set, cfg, reward_fn))
            logger.log(cfg.trainer.steps, {**val, "final": 1.0})
            final = {**final, **val}
            _say("final validation: " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
        if rank == 0:
            from erc_megatron.train.plot import plot_run

            _say(f"plot: {plot_run(run_dir)}")
        sync.close()
        return final
    finally:
        if rank == 0:
            if logger is not None:
                logger.close()
            if servers is not None:
                servers.close()


def run(args: argparse.Namespace) -> int:
    from erc_megatron.train.config import RunConfig
    from erc_megatron.utils import config_tree

    from erc_megatron.utils import console

    console.setup()  # no-op under `erc-megatron train`, which already did it
    # ranks other than 0 log errors only (console.setup)
    logging.basicConfig(level=os.environ.get("ERC_LOG_LEVEL", "WARNING") if console.is_main() else "ERROR",
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = config_tree.load(RunConfig, args.config, args.overrides)
    from erc_megatron.dist import shutdown_distributed

    try:
        train(cfg)
    except Exception as exc:
        # one line to look for under the launcher's per-rank tracebacks
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"[erc-megatron] training failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(run(p.parse_args()))
