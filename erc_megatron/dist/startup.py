"""Distributed start-up: read the launcher's environment, create the default group and megatron's
parallel_state, refusing a layout that does not fit before any model is built, and return the
`ParallelLayout` (erc_megatron.dist.parallel_layout) that the rest of the code takes its groups from.

Launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), srun (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_NODELIST; MASTER_ADDR defaults to the first host of the
step's node list), and mpirun (OMPI_COMM_WORLD_* / PMI_* with MASTER_ADDR exported; or
`erc_megatron.dist.mpi.bootstrap_from_mpi` first, which fills the variables from mpi4py).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from erc_megatron.dist.nodelist import expand_slurm_nodelist
from erc_megatron.dist.parallel_layout import ParallelLayout, layout_from_parallel_state
from erc_megatron.model.config import ConfigError, ModelConfig, ParallelConfig, layout_errors

log = logging.getLogger(__name__)

# what init_distributed made, for callers that are not handed a layout (see current_layout)
_LAYOUT: ParallelLayout | None = None


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """torchrun's variables win (also set by `erc_megatron.dist.mpi`), then srun's, then mpirun's."""
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", "29500"))
    mpi_rank = env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "mpi" if mpi_rank is not None else "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # The step's node list, not the job's: `srun -w` may start the learner on a subset of the
        # job's nodes (rollout nodes first), and rank 0 runs on the first node of the step.
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or expand_slurm_nodelist(nodes)[0]
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                         addr, port, "slurm")
    if mpi_rank is not None:
        if "MASTER_ADDR" not in env:
            raise ConfigError("started by mpirun without MASTER_ADDR: call erc_megatron.dist.mpi.bootstrap_from_mpi() "
                              "(python -m erc_megatron.dist.mpi train ...) or export MASTER_ADDR/MASTER_PORT")
        size = env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE"))
        if size is None:
            raise ConfigError("started by mpirun without OMPI_COMM_WORLD_SIZE or PMI_SIZE in the environment")
        local = env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", "0"))
        return LaunchEnv(int(mpi_rank), int(size), int(local), env["MASTER_ADDR"], port, "mpi")
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def check_layout(world_size: int, parallel: ParallelConfig, model: ModelConfig | None = None) -> None:
    """Raise ConfigError listing every reason the layout does not fit (numbers named)."""
    from erc_megatron.model.gpt import have_transformer_engine

    errors = layout_errors(world_size, parallel, model, has_transformer_engine=have_transformer_engine())
    if errors:
        raise ConfigError("parallel layout does not fit:\n  - " + "\n  - ".join(errors))


def init_distributed(parallel: ParallelConfig, model: ModelConfig | None = None,
                     backend: str | None = None, environ: dict[str, str] | None = None) -> ParallelLayout:
    """Create the default process group (if needed) and megatron's parallel_state; seed RNGs.

    nccl on GPUs, gloo on CPU (where megatron-core's CPU fixes in erc_megatron.patches are applied).
    Returns this rank's layout (its `launch` is how the launcher started it).
    """
    global _LAYOUT
    from megatron.core import parallel_state, tensor_parallel

    from erc_megatron.patches.megatron_cpu import apply_cpu_patches

    env = read_launch_env(environ)
    if dist.is_initialized():
        env = LaunchEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, env.master_addr,
                        env.master_port, env.launcher)
    check_layout(env.world_size, parallel, model)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        apply_cpu_patches()
    else:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        backend = backend or ("nccl" if on_gpu else "gloo")
        dist.init_process_group(
            backend, rank=env.rank, world_size=env.world_size,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    _LAYOUT = layout_from_parallel_state(env)
    torch.manual_seed(parallel.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(parallel.seed)
    log.info("rank %d/%d (%s): %s", env.rank, env.world_size, env.launcher, _LAYOUT.describe())
    return _LAYOUT


def current_layout() -> ParallelLayout:
    """The layout init_distributed returned on this process (for callers not handed one)."""
    if _LAYOUT is None:
        raise RuntimeError("no parallel layout: call erc_megatron.dist.init_distributed first")
    return _LAYOUT


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    global _LAYOUT
    _LAYOUT = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
