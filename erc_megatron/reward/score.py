"""A rollout batch's rewards: the reward function's scores plus DAPO's soft overlong penalty.

Kept apart from the rollout (erc_megatron.rollout.collect asks for scores, it does not make them),
so the reward a step trains on is defined in one place: `reward.fn` (erc_megatron.reward.registry)
and `rollout.overlong_buffer` (erc_megatron.algo.overlong_penalty).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from erc_megatron.algo import overlong_penalty
from erc_megatron.reward.registry import RewardFn, compute_rewards


def score_responses(reward_fn: RewardFn, texts: Sequence[str], answers: Sequence[str], lengths: Sequence[int],
                    overlong: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """float64 [len(texts)] rewards and the reward function's per-sample metrics.

    `overlong` = (max_response_length, overlong_buffer): responses longer than
    max_response_length - overlong_buffer tokens lose up to 1 (erc_megatron.algo.overlong_penalty).
    """
    if len(lengths) != len(texts):
        raise ValueError(f"score_responses: {len(texts)} responses but {len(lengths)} lengths")
    scored = compute_rewards(reward_fn, texts, answers)
    rewards = torch.tensor(scored.scores, dtype=torch.float64)
    if overlong is not None and overlong[1] > 0:
        rewards = rewards + overlong_penalty(torch.tensor(list(lengths)), overlong[0], overlong[1]).to(torch.float64)
    return rewards, scored.metrics
