"""Token-budget packing: which sequences go into which micro-batch of which data-parallel rank.

Pure functions on sequence lengths (prompt + response tokens). Every rank runs them on the same
lengths and gets the same plan, so the plan itself costs no communication.

The plan is first-fit decreasing into bins of `max_tokens`, then the bins are dealt to the
data-parallel ranks largest first, each to the rank with the fewest tokens so far (among the ranks
that still have room: every rank must run the same number of micro-batches, which megatron's
schedule and DDP's gradient reduction need). Ranks left with fewer bins get empty micro-batches
(`[]`): the caller turns them into one masked placeholder that adds nothing to the loss.
"""
from __future__ import annotations

from erc_megatron.model.config import ConfigError

FIELD = "trainer.max_tokens_per_micro_batch"


def first_fit_decreasing(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose lengths sum to at most `max_tokens`.

    Longest first (ties by index), each into the first bin it fits; bins come out in creation order
    and hold their indices in ascending order, so the result depends on the lengths only.
    """
    if max_tokens < 1:
        raise ConfigError(f"{FIELD} must be >= 1 or null, got {max_tokens}")
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"sequence {i} has {n} tokens (prompt + response), more than {FIELD}="
                             f"{max_tokens}: raise {FIELD} to at least {n} (or shorten "
                             "rollout.max_response_length / data.max_prompt_length)")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def pack_for_data_parallel(lengths: list[int], max_tokens: int, dp_size: int) -> list[list[list[int]]]:
    """plan[dp_rank][micro_batch] = indices of `lengths`; every rank gets the same number of
    micro-batches (at least one; empty lists are placeholders), balanced by token count."""
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    bins = first_fit_decreasing(lengths, max_tokens)
    per_rank = max(1, -(-len(bins) // dp_size))
    tokens = [sum(lengths[i] for i in b) for b in bins]
    plan: list[list[list[int]]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for b in sorted(range(len(bins)), key=lambda j: (-tokens[j], j)):
        open_ranks = [r for r in range(dp_size) if len(plan[r]) < per_rank]
        r = min(open_ranks, key=lambda q: (load[q], q))
        plan[r].append(bins[b])
        load[r] += tokens[b]
    for mbs in plan:
        mbs += [[] for _ in range(per_rank - len(mbs))]
    return plan


def cu_seqlens(lengths: list[int]) -> list[int]:
    """Cumulative offsets [0, l0, l0+l1, ...] of sequences laid end to end (THD's cu_seqlens)."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out
