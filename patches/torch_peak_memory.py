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

import torch
from torch.profiler import ProfilerActivity, profile


def peak_cpu_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), peak bytes allocated above the level at the call, on CPU, by this process)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep kineto's start/stop lines off stderr
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        result = fn()
    level = peak = 0
    for _, delta in _memory_events(prof):
        level += delta
        peak = max(peak, level)
    return result, peak


def _memory_events(prof: profile) -> list[tuple[int, int]]:
    """(time ns, +-bytes) of every CPU allocation / free, in time order.

    PRIVATE torch API (checked on torch 2.13): the public `prof.events()` folds allocations into
    the op that made them (net of frees inside it, hiding an op's internal peak), so this reads
    the raw kineto results, where each allocation and free is its own "[memory]" event.
    """
    try:
        raw = prof.profiler.kineto_results.events()
        events = [(e.start_ns(), e.nbytes()) for e in raw
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError as err:
        raise RuntimeError(f"peak_cpu_bytes: torch {torch.__version__} changed the profiler's kineto results "
                           f"(checked on 2.13): {err}") from err
    return sorted(events, key=lambda e: e[0])
