"""erc-megatron: Entropy Ratio Clipping RL post-training on megatron-core.

Submodules are imported lazily so that `erc_megatron.ops` and `erc_megatron.algo` load without
megatron-core (fast process start in tests and benchmarks).
"""
__version__ = "0.1.0"
