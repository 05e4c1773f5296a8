"""RoPE positions that restart at every sequence of a packed row (CPU / local layer spec).

With Transformer Engine, packed rows go through THD attention (`PackedSeqParams` with cu_seqlens)
and megatron applies RoPE per sequence itself. The local spec's DotProductAttention refuses
PackedSeqParams, so a packed row runs as one [1, s] sequence with a block-diagonal causal
attention mask; GPTModel, however, builds RoPE for positions 0..s-1 of the whole row
(`self.rotary_pos_emb(rotary_seq_len, ...)`; position_ids reach only the learned absolute
embedding). This replaces the forward of ONE RotaryEmbedding instance: while `packed_positions`
is active it returns the frequencies of the given per-sequence positions instead, so each
sequence is rotated exactly as it would be alone in a padded row (RoPE is relative, so offset
positions would be equal only up to rounding; restarting makes the numbers identical).

Checked against megatron-core 0.16.1 and 0.19.2 (each run): `RotaryEmbedding.forward(max_seq_len,
offset=0, packed_seq=False, cp_group=None)` returns get_emb(...) of shape [s, 1, 1, dim], and
`GPTModel._preprocess` calls `self.rotary_pos_emb(rotary_seq_len, packed_seq=..., cp_group=...)`;
both verified at install time.
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from .source_rewrite import UpstreamChangedError

CHECKED = "megatron-core 0.16.1, 0.19.2"


def _check_upstream() -> None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt import GPTModel

    params = list(inspect.signature(RotaryEmbedding.forward).parameters)
    pre = getattr(GPTModel, "_preprocess", None)
    source = inspect.getsource(pre) if pre is not None else ""
    calls_rope = "self.rotary_pos_emb(" in source and "rotary_seq_len" in source
    if params[:3] != ["self", "max_seq_len", "offset"] or not calls_rope:
        raise UpstreamChangedError(
            "RotaryEmbedding.forward(max_seq_len, offset, ...) / GPTModel._preprocess's "
            f"self.rotary_pos_emb(rotary_seq_len, ...) changed; packed RoPE positions must be re-checked "
            f"(patch checked against {CHECKED})")
    if "get_emb" not in inspect.getsource(RotaryEmbedding.forward):
        raise UpstreamChangedError(f"RotaryEmbedding.forward no longer uses get_emb (checked against {CHECKED})")


def install_packed_rope(gpt_model) -> bool:
    """Make `gpt_model`'s RoPE honour `packed_positions`; False if the model has no RotaryEmbedding."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = getattr(gpt_model, "rotary_pos_emb", None)
    if rope is None or type(rope) is not RotaryEmbedding:
        return False
    if getattr(rope, "_erc_packed", False):
        return True
    _check_upstream()
    rope._erc_packed = True
    rope._erc_positions = None
    original = rope.forward

    def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        positions = rope._erc_positions
        if positions is None:
            return original(max_seq_len, offset=offset, packed_seq=packed_seq, cp_group=cp_group)
        if offset or (cp_group is not None and cp_group.size() > 1):
            raise NotImplementedError("packed RoPE positions with an offset or context parallelism")
        if positions.numel() != max_seq_len:
            raise RuntimeError(f"packed positions cover {positions.numel()} tokens, the row has {max_seq_len}")
        emb = rope.get_emb(int(positions.max()) + 1, 0)  # [max_pos, 1, 1, dim]
        return emb[positions.to(emb.device)]

    rope.forward = forward
    return True


@contextlib.contextmanager
def packed_positions(gpt_model, position_ids: torch.Tensor):
    """RoPE of `gpt_model` uses `position_ids` ([1, s]) during the forward calls inside."""
    if not install_packed_rope(gpt_model):
        yield
        return
    rope = gpt_model.rotary_pos_emb
    rope._erc_positions = position_ids.reshape(-1)
    try:
        yield
    finally:
        rope._erc_positions = None
