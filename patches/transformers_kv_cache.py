"""Row surgery on a Hugging Face DynamicCache: keep some rows, append a freshly prefilled group.

Continuous batching with left padding needs two operations the cache does not offer directly:
dropping finished rows (and the leading columns that became padding for every row) and
merging a newly prefilled group, whose sequence length differs, into the running batch. Both
rebuild the cache from its per-layer key/value tensors, left-padding the shorter one; the
attention mask is rebuilt alongside with zeros for the padding, so padding stays a prefix of
every row and position ids (tracked by the engine) are unaffected.

Checked against transformers 5.23 (`DynamicCache.layers[i].keys/.values`, constructor argument
`ddp_cache_data`). Caches with sliding-window or linear-attention layers are refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from transformers import DynamicCache

CHECKED = "transformers 5.23"


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") or not hasattr(layer, "values") for layer in layers):
        raise RuntimeError(
            f"DynamicCache in transformers {transformers.__version__} no longer exposes layers[i].keys/"
            f".values (the embedded engine was checked against {CHECKED})")
    if any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise RuntimeError(f"the embedded engine supports full-attention caches only, got layer kinds {kinds}")
    return [(layer.keys, layer.values) for layer in layers]


def _rebuild(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=pairs)


def select_rows(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Keep `rows` of the batch and drop the leading columns that are padding in all of them."""
    index = torch.tensor(rows, dtype=torch.long)
    mask = mask.index_select(0, index)
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if len(real) else mask.shape[1]
    pairs = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
             for k, v in _layers(cache)]
    return _rebuild(pairs), mask[:, start:]


def merge(cache_a: DynamicCache, mask_a: torch.Tensor,
          cache_b: DynamicCache, mask_b: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Stack group b under group a, left-padding whichever is shorter."""
    length = max(mask_a.shape[1], mask_b.shape[1])
    pad_a, pad_b = length - mask_a.shape[1], length - mask_b.shape[1]
    pairs = []
    for (ka, va), (kb, vb) in zip(_layers(cache_a), _layers(cache_b), strict=True):
        # keys/values are [batch, heads, seq, head_dim]: pad dim 2 on the left.
        pairs.append((torch.cat([F.pad(ka, (0, 0, pad_a, 0)), F.pad(kb, (0, 0, pad_b, 0))]),
                      torch.cat([F.pad(va, (0, 0, pad_a, 0)), F.pad(vb, (0, 0, pad_b, 0))])))
    mask = torch.cat([F.pad(mask_a, (pad_a, 0)), F.pad(mask_b, (pad_b, 0))])
    return _rebuild(pairs), mask
