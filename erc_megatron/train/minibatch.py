"""From a step's rollout groups to each data-parallel rank's micro-batches.

Every rank receives the whole step (one broadcast from rank 0), so each can compute the global
denominators of every mini-batch without a collective, then keep only its own slice. Sample
counts are padded with empty (mask 0) sequences to a multiple of dp_size x micro_batch_size: they
contribute nothing to the loss or the denominators, only fixed shapes for the pipeline schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from erc_megatron.rollout.collect import Sample
from erc_megatron.train.batch import MicroBatch, pack_sequences


@dataclass
class MiniBatch:
    everyone: list[MicroBatch]  # every data-parallel rank's micro-batches (for the denominators)
    mine: list[MicroBatch]  # this rank's


def _to_micro_batch(samples: list[Sample | None], seq_length: int, pad_id: int) -> MicroBatch:
    prompts = [s.prompt_ids if s else [pad_id] for s in samples]
    responses = [s.response_ids if s else [] for s in samples]
    mb = pack_sequences(prompts, responses, pad_id=pad_id, seq_length=seq_length)
    adv = torch.zeros_like(mb.loss_mask)
    rollout = torch.zeros_like(mb.loss_mask)
    for i, s in enumerate(samples):
        if s is None or not s.response_ids:
            continue
        start = len(s.prompt_ids) - 1
        n = len(s.response_ids)
        adv[i, start:start + n] = s.advantage
        lps = s.rollout_logprobs[:n] + [0.0] * max(0, n - len(s.rollout_logprobs))
        rollout[i, start:start + n] = torch.tensor(lps, dtype=torch.float32)
    rewards = torch.tensor([s.reward if s else float("-inf") for s in samples], dtype=torch.float32)
    return mb.with_(advantages=adv * mb.loss_mask, rollout_logp=rollout, rewards=rewards)


def step_seq_length(groups: list[list[Sample]], multiple: int = 8) -> int:
    longest = max((len(s.prompt_ids) + len(s.response_ids) for g in groups for s in g), default=1)
    return -(-longest // multiple) * multiple


def split_minibatches(groups: list[list[Sample]], prompts_per_minibatch: int, dp_rank: int, dp_size: int,
                      micro_batch_size: int, pad_id: int, seq_length: int | None = None) -> list[MiniBatch]:
    seq_length = seq_length or step_seq_length(groups)
    out = []
    for start in range(0, len(groups), prompts_per_minibatch):
        samples: list[Sample | None] = [s for g in groups[start:start + prompts_per_minibatch] for s in g]
        per_rank_unit = dp_size * micro_batch_size
        samples += [None] * (-len(samples) % per_rank_unit)
        per_rank = len(samples) // dp_size
        everyone, mine = [], []
        for r in range(dp_size):
            part = samples[r * per_rank:(r + 1) * per_rank]
            mbs = [_to_micro_batch(part[i:i + micro_batch_size], seq_length, pad_id)
                   for i in range(0, len(part), micro_batch_size)]
            everyone += mbs
            if r == dp_rank:
                mine = mbs
        out.append(MiniBatch(everyone, mine))
    return out
