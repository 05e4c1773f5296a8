"""DAPO-style group advantages (of reward tensors, or set on a step's sampled responses), dynamic
sampling and the soft overlong penalty.

Rewards of one rollout step are laid out group by group: the `group_size` responses of prompt 0,
then those of prompt 1, and so on.
"""
from __future__ import annotations

import operator
import warnings
from typing import Any, Protocol
from collections.abc import Sequence

import torch


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    return rewards.reshape(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (R_i - mean(R_group)) / (std(R_group) + eps), one per response.

    std is the UNBIASED sample std (Bessel's correction, n - 1), as torch.std's default used by
    verl's compute_grpo_outcome_advantage, which the DAPO and ERC code build on. A group whose
    rewards are all equal gets A = 0 exactly. group_size must be >= 2 (one response has no
    group to be relative to; verl would silently use mean 0, std 1 there). Computed in float64,
    returned in the rewards' floating dtype (float32 for integer rewards).
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    grouped = _grouped(rewards, group_size).to(torch.float64)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=True, keepdim=True)
    adv = ((grouped - mean) / (std + eps)).reshape(-1)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return adv.to(out_dtype)


class ScoredResponse(Protocol):
    """What `set_group_advantages` reads and writes (erc_megatron.rollout.collect.Sample is one)."""

    reward: float
    advantage: float


def set_group_advantages(groups: Sequence[Sequence[ScoredResponse]], eps: float = 1e-6) -> torch.Tensor:
    """Give every response of `groups` (equal-sized groups of one prompt each) its group advantage.

    Returns the [num_groups, group_size] float64 advantages it wrote (`group_advantages` of the rewards).
    """
    if not groups:
        return torch.zeros(0, 0, dtype=torch.float64)
    size = len(groups[0])
    if any(len(g) != size for g in groups):
        raise ValueError(f"groups must all have {size} responses, got sizes {sorted({len(g) for g in groups})}")
    rewards = torch.tensor([[r.reward for r in g] for g in groups], dtype=torch.float64)
    adv = group_advantages(rewards.reshape(-1), size, eps).reshape(len(groups), size)
    for group, row in zip(groups, adv.tolist()):
        for response, a in zip(group, row):
            response.advantage = a
    return adv


def broadcast_to_tokens(adv_per_seq: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B] advantages -> [B, T]: each response token gets its sequence's value, 0 elsewhere."""
    if response_mask.dim() != 2 or tuple(adv_per_seq.shape) != tuple(response_mask.shape[:1]):
        raise ValueError(f"need adv_per_seq [B] and response_mask [B, T], got {tuple(adv_per_seq.shape)} "
                         f"and {tuple(response_mask.shape)}")
    dtype = adv_per_seq.dtype if adv_per_seq.is_floating_point() else torch.float32
    return torch.where(response_mask > 0, adv_per_seq.to(dtype).unsqueeze(-1), 0.0)


def dynamic_sampling_filter(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [num_groups]: True for groups whose rewards are not all equal (they carry signal)."""
    grouped = _grouped(rewards, group_size)
    return grouped.amax(dim=1) != grouped.amin(dim=1)


class DynamicSamplingExhausted(RuntimeError):
    """The cap on extra generation rounds was hit before enough informative groups were found."""


class DynamicSampler:
    """Over-sample-and-refill bookkeeping for DAPO dynamic sampling (no generation of its own).

    Each generation round the caller hands in its groups and their rewards; groups whose rewards
    all equal are dropped, the rest are kept until `target_groups` are collected. `take()` returns
    exactly `target_groups` groups (the surplus of the last round is discarded, as in DAPO).
    After `1 + max_extra_rounds` rounds without reaching the target, `add` raises
    DynamicSamplingExhausted, or with allow_partial=True warns and lets `take()` return what
    there is.

        sampler = DynamicSampler(target_groups=128, group_size=8, max_extra_rounds=4)
        while not sampler.done:
            groups, rewards = generate(prompts_for(sampler.missing))
            sampler.add(groups, rewards)
        batch = sampler.take()
    """

    def __init__(self, target_groups: int, group_size: int, max_extra_rounds: int, allow_partial: bool = False):
        if target_groups < 1:
            raise ValueError(f"target_groups must be >= 1, got {target_groups}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if max_extra_rounds < 0:
            raise ValueError(f"max_extra_rounds must be >= 0, got {max_extra_rounds}")
        self.target_groups = target_groups
        self.group_size = group_size
        self.max_extra_rounds = max_extra_rounds
        self.allow_partial = allow_partial
        self.rounds = 0
        self.seen_groups = 0
        self.exhausted = False
        self._kept: list[Any] = []

    @property
    def kept(self) -> int:
        return len(self._kept)

    @property
    def missing(self) -> int:
        """Informative groups still needed."""
        return max(0, self.target_groups - len(self._kept))

    @property
    def full(self) -> bool:
        return self.missing == 0

    @property
    def done(self) -> bool:
        """Stop generating: target reached, or (allow_partial) the round cap was hit."""
        return self.full or self.exhausted

    def add(self, groups: Sequence[Any], rewards: torch.Tensor) -> int:
        """Record one generation round; returns how many of its groups were kept."""
        if self.done:
            raise RuntimeError("DynamicSampler.add called after it is done; call take()")
        keep = dynamic_sampling_filter(torch.as_tensor(rewards).reshape(-1), self.group_size)
        if len(groups) != keep.numel():
            raise ValueError(f"{len(groups)} groups but rewards for {keep.numel()} groups of {self.group_size}")
        self.rounds += 1
        self.seen_groups += len(groups)
        new = [g for g, k in zip(groups, keep.tolist()) if k]
        self._kept.extend(new)
        if not self.full and self.rounds >= 1 + self.max_extra_rounds:
            msg = (f"dynamic sampling kept {len(self._kept)} of {self.target_groups} groups after {self.rounds} "
                   f"rounds ({self.seen_groups} groups generated, max_extra_rounds={self.max_extra_rounds}): "
                   "raise max_extra_rounds or the over-sampling factor, or check that rewards vary")
            if not self.allow_partial:
                raise DynamicSamplingExhausted(msg)
            warnings.warn(msg + "; training on the partial batch", RuntimeWarning, stacklevel=2)
            self.exhausted = True
        return len(new)

    def take(self) -> list[Any]:
        """The kept groups (exactly target_groups unless partial), and reset for the next step."""
        if not self.done:
            raise RuntimeError(f"DynamicSampler.take called with {self.missing} groups still missing")
        out = self._kept[: self.target_groups]
        self._kept, self.rounds, self.seen_groups, self.exhausted = [], 0, 0, False
        return out


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the reward.

    0 if |y| <= max_len - cache_len; ((max_len - cache_len) - |y|) / cache_len if
    max_len - cache_len < |y| <= max_len (linear from 0 down to -1); -1 if |y| > max_len.
    Requires 0 <= cache_len <= max_len (cache_len 0 leaves only the first and last cases).
    """
    try:
        max_len, cache_len = operator.index(max_len), operator.index(cache_len)
    except TypeError:
        raise ValueError(f"max_len and cache_len must be integers, got {max_len!r} and {cache_len!r}") from None
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"cache_len must be in [0, max_len={max_len}], got {cache_len}")
    lengths = torch.as_tensor(lengths)
    y = lengths.to(torch.float64)
    start = max_len - cache_len
    ramp = (start - y) / max(cache_len, 1)  # guarded: with cache_len 0 the ramp case is empty
    out = torch.where(y <= start, torch.zeros_like(y), torch.where(y <= max_len, ramp, -torch.ones_like(y)))
    return out.to(torch.float32)


