"""Token layout of one micro-batch as the learner sees it.

Padded (the default): sequences are prompt + response, right-padded to a common length `s`.
Position t predicts token t+1, so every per-token tensor is aligned with
`labels[:, t] = tokens[:, t + 1]`, and `loss_mask` is 1 where that label is a generated (response)
token that counts. Right padding needs no attention mask under causal attention.

Packed (`trainer.max_tokens_per_micro_batch`): one row [1, s] holds several sequences end to end,
`seq_lengths` says how many tokens each has (a trailing pad run, if any, is not a sequence). Labels
are taken inside each sequence (its last token has no target and mask 0), positions restart at 0
for each sequence and attention is causal within a sequence only (block-diagonal), so every
sequence sees exactly what it would see alone in a padded row. `unpack` turns per-token values
back into [sequences, longest] rows for the loss, whose per-sequence statistics then need nothing
packed-specific.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] long
    labels: torch.Tensor  # [b, s] long
    loss_mask: torch.Tensor  # [b, s] float
    advantages: torch.Tensor | None = None  # [b, s]
    old_logp: torch.Tensor | None = None  # [b, s], from the old-policy pass
    old_entropy: torch.Tensor | None = None  # [b, s]
    rollout_logp: torch.Tensor | None = None  # [b, s], the rollout engine's own log-probs (TIS)
    rewards: torch.Tensor | None = None  # [b] sequence rewards (positive-sample NLL); [n] when packed
    seq_lengths: list[int] | None = None  # packed: tokens of each sequence in the row; None: padded

    @property
    def packed(self) -> bool:
        return self.seq_lengths is not None

    @property
    def position_ids(self) -> torch.Tensor:
        b, s = self.tokens.shape
        if self.packed:
            return packed_position_ids(self.seq_lengths, s).to(self.tokens.device)
        return torch.arange(s, device=self.tokens.device).unsqueeze(0).expand(b, s)

    def with_(self, **kw) -> MicroBatch:
        return replace(self, **kw)

    def to(self, device: torch.device | str) -> MicroBatch:
        """Every tensor on `device` (micro-batches are built on the CPU; the model may be on a GPU)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)



def pack_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0,
                   seq_length: int | None = None) -> MicroBatch:
    """Right-padded prompt+response sequences with labels and the response mask."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    s = seq_length or max(lengths)
    if max(lengths) > s:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit seq_length {s}")
    b = len(prompts)
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    mask = torch.zeros(b, s, dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        if r:
            mask[i, len(p) - 1 : len(p) - 1 + len(r)] = 1.0
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    return MicroBatch(tokens=tokens, labels=labels, loss_mask=mask)


def response_values(per_token: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per-sequence response-token values (inverse of the alignment above)."""
    return [row[m.bool()] for row, m in zip(per_token, mask)]


def _segments(seq_lengths: list[int], row_length: int) -> list[int]:
    """Sequence lengths plus the trailing pad run (its own segment), summing to row_length."""
    used = sum(seq_lengths)
    if used > row_length:
        raise ValueError(f"sequences of {used} tokens do not fit a packed row of {row_length}")
    return list(seq_lengths) + ([row_length - used] if used < row_length else [])


def packed_position_ids(seq_lengths: list[int], row_length: int) -> torch.Tensor:
    """[1, row_length]: 0.. for each sequence (and for the trailing pad run)."""
    return torch.cat([torch.arange(n) for n in _segments(seq_lengths, row_length)]).unsqueeze(0)


def packed_cu_seqlens(seq_lengths: list[int], row_length: int) -> torch.Tensor:
    """int32 [segments + 1] offsets of the row's segments (THD's cu_seqlens; the pad run is one)."""
    from erc_megatron.train.packing import cu_seqlens

    return torch.tensor(cu_seqlens(_segments(seq_lengths, row_length)), dtype=torch.int32)


def packed_attention_mask(seq_lengths: list[int], row_length: int) -> torch.Tensor:
    """[1, 1, s, s] bool, True where attention is NOT allowed (megatron's convention): causal inside
    each segment, nothing across segments."""
    seg = torch.repeat_interleave(torch.arange(len(_segments(seq_lengths, row_length))),
                                  torch.tensor(_segments(seq_lengths, row_length)))
    pos = torch.arange(row_length)
    allowed = (seg.unsqueeze(1) == seg.unsqueeze(0)) & (pos.unsqueeze(1) >= pos.unsqueeze(0))
    return (~allowed).view(1, 1, row_length, row_length)


def pack_row(prompts: list[list[int]], responses: list[list[int]], row_length: int, pad_id: int = 0) -> MicroBatch:
    """One packed row [1, row_length] of prompt+response sequences with per-sequence labels and mask."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    tokens = torch.full((1, row_length), pad_id, dtype=torch.long)
    labels = torch.full_like(tokens, pad_id)
    mask = torch.zeros(1, row_length, dtype=torch.float32)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    _segments(lengths, row_length)
    at = 0
    for p, r, n in zip(prompts, responses, lengths):
        seq = torch.tensor(list(p) + list(r), dtype=torch.long)
        tokens[0, at:at + n] = seq
        labels[0, at:at + n - 1] = seq[1:]  # the last token's target would be the next sequence's
        if r:
            mask[0, at + len(p) - 1:at + len(p) - 1 + len(r)] = 1.0
        at += n
    return MicroBatch(tokens=tokens, labels=labels, loss_mask=mask, seq_lengths=lengths)


def unpack_index(seq_lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [n, longest] into the packed row, valid [n, longest] bool) for `unpack`."""
    longest = max(seq_lengths, default=0)
    starts = torch.tensor([0] + seq_lengths[:-1], dtype=torch.long).cumsum(0) if seq_lengths else torch.zeros(0)
    offs = torch.arange(longest)
    valid = offs.unsqueeze(0) < torch.tensor(seq_lengths, dtype=torch.long).unsqueeze(1)
    index = torch.where(valid, starts.unsqueeze(1) + offs.unsqueeze(0), 0)
    return index, valid


def unpack(per_token: torch.Tensor, seq_lengths: list[int], index: tuple[torch.Tensor, torch.Tensor] | None = None
           ) -> torch.Tensor:
    """[1, s] packed values -> [n, longest] rows, 0 past each sequence's end (differentiable)."""
    idx, valid = index if index is not None else unpack_index(seq_lengths)
    idx, valid = idx.to(per_token.device), valid.to(per_token.device)
    rows = per_token[0][idx]
    return torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
