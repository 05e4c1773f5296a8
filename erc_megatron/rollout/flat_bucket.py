"""SGLang's `load_format="flattened_bucket"` wire layout for weight broadcasts.

Checked against `sglang.srt.weight_sync.tensor_bucket.FlattenedTensorBucket` after SGLang PR
#13413 (Nov 2025, "Allow passing tensors of different dtypes"): every tensor is flattened,
viewed as raw bytes (`torch.uint8`) and concatenated in request order; the receiver allocates
one uint8 tensor of the total byte count, receives ONE broadcast into it, and cuts it back
into tensors by byte offsets (`view(dtype).reshape(shape)`). Before that PR SGLang
concatenated elements of a single dtype instead of bytes; for a bucket of one dtype both carry
the same bytes, but the broadcast buffer's dtype differs, so a sender must match the server's
SGLang version (this module matches the current one, uint8).
"""
from __future__ import annotations

import math

import torch


def bucket_nbytes(dtypes: list[torch.dtype], shapes: list[list[int]]) -> int:
    """Total bytes of a bucket with these tensor dtypes and shapes."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
               for dtype, shape in zip(dtypes, shapes, strict=True))


def flatten_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The uint8 buffer a sender broadcasts for `tensors` (in the order of the request's names).

    Tensors that already lie back to back in one storage (a bucket received from another
    pipeline stage) are viewed, not copied.
    """
    if not tensors:
        raise ValueError("cannot flatten an empty bucket")
    view = _adjacent_bytes(tensors)
    if view is not None:
        return view
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def _adjacent_bytes(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    first = tensors[0].detach()
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != storage or t.data_ptr() != end:
            return None
        end += t.numel() * t.element_size()
    if end == first.data_ptr():
        return None
    return torch.as_strided(first.reshape(-1).view(torch.uint8) if first.numel() else first.view(torch.uint8),
                            (end - first.data_ptr(),), (1,))


def unflatten_tensors(buffer: torch.Tensor, dtypes: list[torch.dtype], shapes: list[list[int]]) -> list[torch.Tensor]:
    """Cut a received uint8 buffer back into tensors: views where the byte offset suits the
    dtype's alignment, copies where it does not (mixed dtypes)."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError(f"a flattened bucket is a 1-D uint8 tensor, got {buffer.dtype} {tuple(buffer.shape)}")
    expected = bucket_nbytes(dtypes, shapes)
    if buffer.numel() != expected:
        raise ValueError(f"flattened bucket has {buffer.numel()} bytes, the names/dtypes/shapes describe {expected}")
    out, offset = [], 0
    for dtype, shape in zip(dtypes, shapes, strict=True):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        piece = buffer[offset:offset + nbytes]
        element = torch.empty((), dtype=dtype).element_size()
        if (buffer.data_ptr() + offset) % element:
            piece = piece.clone()
        out.append(piece.view(dtype).reshape(shape))
        offset += nbytes
    return out
