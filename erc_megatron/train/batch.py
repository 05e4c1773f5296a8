"""Token layout of one micro-batch as the learner sees it.

Sequences are prompt + response, right-padded to a common length `s`. Position t predicts token
t+1, so every per-token tensor is aligned with `labels[:, t] = tokens[:, t + 1]`, and `loss_mask`
is 1 where that label is a generated (response) token that counts. Right padding needs no
attention mask under causal attention.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

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
    rewards: torch.Tensor | None = None  # [b] sequence rewards (positive-sample NLL)

    @property
    def position_ids(self) -> torch.Tensor:
        b, s = self.tokens.shape
        return torch.arange(s, device=self.tokens.device).unsqueeze(0).expand(b, s)

    def with_(self, **kw) -> MicroBatch:
        return replace(self, **kw)



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
