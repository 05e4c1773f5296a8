"""`erc-megatron train --config examples/<recipe>.yaml [section.key=value ...]` (under torchrun/srun).

The train loop: start-up (erc_megatron.train.run), then per step the phases of
erc_megatron.train.phases in order: collect (rollout -> rewards -> group advantages with dynamic
sampling on rank 0, each data-parallel rank's share as compact tensors) -> old policy (old_logp, H_old) -> policy update
(mini-batches with ERC) -> weight sync to the rollout servers -> log / checkpoint.
Rank 0 drives the rollout servers; when `rollout.server_urls` is empty it starts the embedded CPU
server (erc_megatron.rollout_server) itself: same protocol as SGLang, same code path.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
import torch.distributed as dist


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from erc_megatron.train.config import RunConfig
    from erc_megatron.utils.config_docs import describe

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "config fields (YAML section.key, or a section.key=value override):\n" + "\n".join(
        "  " + line for line in describe(RunConfig))
    parser.add_argument("--config", required=True, help="recipe YAML (see examples/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. trainer.steps=10")


def train(cfg) -> dict:
    """Run `cfg` to trainer.steps; returns the last step's metrics (with the final validation's)."""
    from erc_megatron.train.phases.collect import collect
    from erc_megatron.train.phases.log_checkpoint import final_validation, log_checkpoint
    from erc_megatron.train.phases.old_policy import old_policy
    from erc_megatron.train.phases.policy_update import policy_update
    from erc_megatron.train.phases.sync_weights import sync_weights
    from erc_megatron.train.plot import plot_run
    from erc_megatron.train.run import close_run, start_rollout, start_run
    from erc_megatron.utils.console import say

    run, state = start_run(cfg)
    try:
        start_rollout(run, state)
        launch = run.layout.launch
        say(f"training steps {state.step + 1}..{cfg.trainer.steps} ({launch.world_size} ranks started by "
            f"{launch.launcher}, rendezvous {launch.master_addr}:{launch.master_port})")
        for step in range(state.step, cfg.trainer.steps):
            run.profiler.begin_step(step + 1)
            share, metrics = collect(run, state, step)
            if share is not None:
                minibatches = old_policy(run, share, metrics)
                policy_update(run, minibatches, metrics)
                sync_weights(run, state, metrics)
            else:
                # still logged and checkpointed: the step consumed its prompts
                say(f"step {step + 1}: no informative groups (all rewards equal in every group); skipping update")
            run.profiler.end_step()
            state.step = step + 1
            log_checkpoint(run, state, metrics)
        final = {**state.last_metrics, **final_validation(run, state)}
        if run.rank0 is not None:
            say(f"plot: {plot_run(cfg.trainer.run_dir)}")
        run.sync.close()
        return final
    finally:
        close_run(run)


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
