"""Read every CPU allocation and free the torch profiler recorded, one event each.

PRIVATE torch API (checked on torch 2.13): the public `prof.events()` folds allocations into the op
that made them (net of frees inside it, hiding an op's internal peak), so this reads the raw kineto
results, where each allocation and free is its own "[memory]" event. Used by
`erc_megatron.testing.peak_memory`; fails loudly if torch changed the shape of those results.
"""
from __future__ import annotations

import torch
from torch.profiler import profile

CHECKED = "2.13"


def cpu_memory_events(prof: profile) -> list[tuple[int, int]]:
    """(time ns, +-bytes) of every CPU allocation / free recorded by `prof`, in time order."""
    try:
        raw = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        events = [(e.start_ns(), e.nbytes()) for e in raw
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError as err:
        raise RuntimeError(f"cpu_memory_events: torch {torch.__version__} changed the profiler's kineto results "
                           f"(checked on {CHECKED}): {err}") from err
    return sorted(events, key=lambda e: e[0])
