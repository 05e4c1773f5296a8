"""`TransferBuffers`: scratch space grows and is reused; a bucket buffer is reused only after it was
handed back, and never when the stream's buckets stay the caller's."""
from __future__ import annotations

import torch

from erc_megatron.weights.transfer_buffers import TransferBuffers


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_scratch_is_reused_and_grows():
    buffers = TransferBuffers()
    a = buffers.scratch("gathered", 100, torch.float32, "cpu")
    assert a.shape == (100,) and a.dtype == torch.float32
    b = buffers.scratch("gathered", 50, torch.bfloat16, "cpu")  # smaller, another dtype: same bytes
    assert _ptr(b) == _ptr(a) and b.shape == (50,) and b.dtype == torch.bfloat16
    other = buffers.scratch("shards", 10, torch.float32, "cpu")
    assert _ptr(other) != _ptr(a)
    c = buffers.scratch("gathered", 101, torch.float32, "cpu")  # too small: a new, larger one
    assert _ptr(c) != _ptr(a) and c.numel() == 101
    assert buffers.held_bytes == 101 * 4 + 10 * 4


def test_bucket_buffers_are_reused_only_after_release():
    buffers = TransferBuffers()
    first = buffers.bucket(1000, torch.float32, "cpu")
    second = buffers.bucket(1000, torch.float32, "cpu")  # the first is still lent
    assert _ptr(first) != _ptr(second)
    first.fill_(1.0)
    buffers.release(first.view(torch.uint8)[:10])  # any view of it hands it back
    third = buffers.bucket(500, torch.float32, "cpu")
    assert _ptr(third) == _ptr(first) and third.shape == (500,)
    buffers.release(torch.zeros(3))  # not one of ours: ignored
    fourth = buffers.bucket(2000, torch.float32, "cpu")  # nothing free that is big enough
    assert _ptr(fourth) not in {_ptr(first), _ptr(second)}
    buffers.release(second)
    buffers.release(fourth)
    fifth = buffers.bucket(900, torch.float32, "cpu")  # the smallest free one that fits
    assert _ptr(fifth) == _ptr(second)


def test_without_bucket_reuse_every_bucket_is_new_and_unreferenced():
    buffers = TransferBuffers(reuse_buckets=False)
    first = buffers.bucket(1000, torch.float32, "cpu")
    ptr = _ptr(first)
    buffers.release(first)
    second = buffers.bucket(1000, torch.float32, "cpu")
    assert _ptr(second) != ptr and buffers.held_bytes == 0
