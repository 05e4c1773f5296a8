"""Distributed start-up, layout validation, and the parallel layout (process groups) start-up returns.

Imported lazily: `python -m erc_megatron.dist.nodelist` (called by the Slurm script) must not pay
for torch and megatron-core.
"""
__all__ = ["GroupPlace", "LaunchEnv", "ParallelLayout", "check_layout", "current_layout", "expand_slurm_nodelist",
           "init_distributed", "read_launch_env", "shutdown_distributed"]


def __getattr__(name: str):
    if name == "expand_slurm_nodelist":
        from erc_megatron.dist.nodelist import expand_slurm_nodelist

        return expand_slurm_nodelist
    if name in ("GroupPlace", "ParallelLayout"):
        from erc_megatron.dist import parallel_layout

        return getattr(parallel_layout, name)
    if name in __all__:
        from erc_megatron.dist import startup

        return getattr(startup, name)
    raise AttributeError(f"module 'erc_megatron.dist' has no attribute {name!r}")
