"""Reusable buffers for `iter_hf_weights`: the TP gathers' scratch space and the buckets' flat buffers.

On CPU a freshly allocated large tensor costs a page fault per 4 KiB page at its first touch (glibc
hands allocations above 32 MiB straight to mmap and back to the kernel on free). Measured on the
2-core CPU machine: copying 170 MB into a fresh buffer took 0.12-0.22 s, into a reused one
0.045-0.08 s. A weight sync moves every parameter through two scratch buffers (its TP shards, the
gathered rows) and a bucket, every step, so `WeightSync` keeps one `TransferBuffers`
for the run on CPU. On CUDA the caching allocator already reuses memory, and holding buckets for the
whole run would cost colocated rollout engines GPU memory, so there each stream gets its own, with
`reuse_buckets=False` (a bucket handed back while a broadcast on another CUDA stream still reads it
must not be refilled; torch's caching allocator, with `record_stream`, already handles a freed one).

Scratch space is used by the producing thread only, one gather group at a time. A bucket stays
the consumer's until it hands it back with `release` (after its broadcast or POST finished); a
bucket never handed back is never reused; a stream whose caller keeps its buckets (HF export) uses
`reuse_buckets=False`, which keeps no reference to them.
"""
from __future__ import annotations

import threading

import torch


class TransferBuffers:
    """Named scratch buffers plus a free list of bucket buffers (thread safe: produced in one thread,
    released in another)."""

    def __init__(self, reuse_buckets: bool = True):
        self.reuse_buckets = reuse_buckets
        """False: `bucket` always allocates and keeps no reference (a stream whose buckets are kept)."""
        self._scratch: dict[str, torch.Tensor] = {}
        self._free: list[torch.Tensor] = []  # uint8 bases ready for reuse
        self._lent: dict[int, torch.Tensor] = {}  # storage address -> uint8 base of a bucket in use
        self._lock = threading.Lock()

    def scratch(self, key: str, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A 1-D `dtype` tensor of `numel` elements over the buffer `key`, grown when too small. Its
        contents are overwritten by the next call with the same key."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        base = self._scratch.get(key)
        if base is None or base.numel() < nbytes or base.device != torch.device(device):
            base = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._scratch[key] = base
        return base[:nbytes].view(dtype)

    def bucket(self, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A 1-D `dtype` tensor of `numel` elements, from a released bucket buffer when one is big enough."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        device = torch.device(device)
        if not self.reuse_buckets:
            return torch.empty(numel, dtype=dtype, device=device)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes and b.device == device]
            base = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if base is None:
            base = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        with self._lock:
            self._lent[base.untyped_storage().data_ptr()] = base
        return base[:nbytes].view(dtype)

    def release(self, tensor: torch.Tensor) -> None:
        """Hand back the bucket `tensor` is (a view of); unknown tensors are ignored."""
        with self._lock:
            base = self._lent.pop(tensor.untyped_storage().data_ptr(), None)
            if base is not None:
                self._free.append(base)

    @property
    def held_bytes(self) -> int:
        """Bytes this object holds (scratch, free and lent buckets)."""
        with self._lock:
            return (sum(b.numel() for b in self._scratch.values()) + sum(b.numel() for b in self._free)
                    + sum(b.numel() for b in self._lent.values()))
