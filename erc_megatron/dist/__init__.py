"""Distributed start-up and layout validation."""
from erc_megatron.dist.startup import (LaunchEnv, check_layout, expand_slurm_nodelist, init_distributed,
                                       read_launch_env, shutdown_distributed)

__all__ = ["LaunchEnv", "check_layout", "expand_slurm_nodelist", "init_distributed", "read_launch_env",
           "shutdown_distributed"]
