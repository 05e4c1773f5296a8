"""Work that only rank 0 does (HTTP to the rollout servers, rewards, logging), handed to every rank."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def broadcast_from_rank0(obj: T) -> T:
    """Rank 0's `obj` on every rank (pickled; a no-op without a multi-rank default group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn: Callable[[], T]) -> T:
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
    result, message = broadcast_from_rank0((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed, stopping: {message}")
    return result  # type: ignore[return-value]
