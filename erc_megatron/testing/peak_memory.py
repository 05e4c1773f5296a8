"""Measure the peak of CPU tensor memory allocated while a function runs.

torch has no `memory_allocated()` for CPU. The profiler with `profile_memory=True` sees every
allocation and free of the CPU allocator (op outputs and the temporaries ops make internally), so
the running sum of its memory events, started at 0 when the function is called, peaks at the
extra bytes the function held at its worst moment. Used by the tests and the benchmark to check
the memory contract of the ops; it slows the function down, so time it separately.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile

from erc_megatron.patches.torch_profiler_memory import cpu_memory_events


def peak_cpu_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), peak bytes allocated above the level at the call, on CPU, by this process)."""
    result, peak, _ = peak_and_held_cpu_bytes(fn)
    return result, peak


def peak_and_held_cpu_bytes(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """(fn(), peak bytes above the level at the call, bytes still held when fn returned): for a forward
    pass, what it keeps alive for backward (activations) besides its output."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep kineto's start/stop lines off stderr
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        result = fn()
    level = peak = 0
    for _, delta in cpu_memory_events(prof):
        level += delta
        peak = max(peak, level)
    return result, peak, level
