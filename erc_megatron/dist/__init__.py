"""Distributed start-up and layout validation.

Imported lazily: `python -m erc_megatron.dist.nodelist` (called by the Slurm script) must not pay
for torch and megatron-core.
"""
__all__ = ["LaunchEnv", "check_layout", "expand_slurm_nodelist", "init_distributed", "read_launch_env",
           "shutdown_distributed"]


def __getattr__(name: str):
    if name == "expand_slurm_nodelist":
        from erc_megatron.dist.nodelist import expand_slurm_nodelist

        return expand_slurm_nodelist
    if name in __all__:
        from erc_megatron.dist import startup

        return getattr(startup, name)
    raise AttributeError(f"module 'erc_megatron.dist' has no attribute {name!r}")
