"""From a step's rollout groups to each data-parallel rank's micro-batches.

Every rank holds the step's `RolloutTable` (lengths, rewards, advantages: a few numbers per
sample) and derives the same `MiniBatchPlan`s from it; token ids travel only to the ranks whose
micro-batches hold them (train/rollout_share.py). The token-mean and NLL denominators of a
mini-batch come from the table's lengths, so they stay global and exact without a collective.

Padded (trainer.max_tokens_per_micro_batch unset): sample counts are padded with empty (mask 0)
placeholders to a multiple of dp_size x micro_batch_size, each rank takes a contiguous slice, each
micro-batch is right-padded to the step's longest sequence. Packed: sequences are packed without
padding into rows of at most max_tokens_per_micro_batch tokens, balanced over the data-parallel
ranks by token count (train/packing.py); a rank with fewer rows gets placeholder rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from erc_megatron.rollout.collect import Sample
from erc_megatron.train.batch import MicroBatch, pack_row, pack_sequences
from erc_megatron.train.packing import pack_for_data_parallel


@dataclass
class RolloutTable:
    """Per sample (groups flattened in order): what the plan and the denominators need."""

    prompt_lens: list[int]
    response_lens: list[int]
    rewards: list[float]
    advantages: list[float]
    group_sizes: list[int]

    @classmethod
    def from_groups(cls, groups: list[list[Sample]]) -> RolloutTable:
        flat = [s for g in groups for s in g]
        return cls([len(s.prompt_ids) for s in flat], [len(s.response_ids) for s in flat],
                   [float(s.reward) for s in flat], [float(s.advantage) for s in flat], [len(g) for g in groups])

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def seq_len(self, i: int) -> int:
        return self.prompt_lens[i] + self.response_lens[i]


@dataclass
class MiniBatchPlan:
    samples: list[int]  # global indices of the mini-batch's samples
    ranks: list[list[list[int | None]]]  # [dp_rank][micro_batch] -> sample indices; None: placeholder


@dataclass
class MiniBatch:
    mine: list[MicroBatch]  # this rank's micro-batches
    response_lens: list[int]  # the whole mini-batch's (every data-parallel rank's) samples
    rewards: list[float]

    def denominators(self, agg: str, with_nll: bool):
        from erc_megatron.train.update import denominators_from_lengths

        return denominators_from_lengths(self.response_lens, self.rewards, agg, with_nll)


def step_seq_length(groups_or_table, multiple: int = 8) -> int:
    table = groups_or_table if isinstance(groups_or_table, RolloutTable) else RolloutTable.from_groups(groups_or_table)
    longest = max((table.seq_len(i) for i in range(len(table))), default=1)
    return -(-longest // multiple) * multiple


def plan_minibatches(table: RolloutTable, prompts_per_minibatch: int, dp_size: int, micro_batch_size: int,
                     max_tokens: int | None = None) -> list[MiniBatchPlan]:
    """The same plan on every rank (a pure function of the table)."""
    bounds = [0]
    for size in table.group_sizes:
        bounds.append(bounds[-1] + size)
    plans = []
    for g in range(0, len(table.group_sizes), prompts_per_minibatch):
        samples = list(range(bounds[g], bounds[min(g + prompts_per_minibatch, len(table.group_sizes))]))
        if max_tokens is None:
            slots: list[int | None] = samples + [None] * (-len(samples) % (dp_size * micro_batch_size))
            per_rank = len(slots) // dp_size
            ranks = [[slots[r * per_rank + i:r * per_rank + i + micro_batch_size]
                      for i in range(0, per_rank, micro_batch_size)] for r in range(dp_size)]
        else:
            local = pack_for_data_parallel([table.seq_len(i) for i in samples], max_tokens, dp_size)
            ranks = [[[samples[i] for i in mb] or [None] for mb in mbs] for mbs in local]
        plans.append(MiniBatchPlan(samples, ranks))
    return plans


def samples_of_rank(plans: list[MiniBatchPlan], dp_rank: int) -> list[int]:
    """Global indices of the samples `dp_rank` needs, in the order its micro-batches use them."""
    return [i for p in plans for mb in p.ranks[dp_rank] for i in mb if i is not None]


def packed_row_length(table: RolloutTable, plans: list[MiniBatchPlan], max_tokens: int, multiple: int = 8) -> int:
    """One row length for the whole step (the pipeline schedule needs equal shapes): the fullest row,
    rounded up to `multiple` but not past the budget."""
    fullest = max((sum(table.seq_len(i) for i in mb if i is not None) for p in plans for mbs in p.ranks for mb in mbs),
                  default=1)
    return min(-(-fullest // multiple) * multiple, max(max_tokens, fullest))


def _fill(mb: MicroBatch, samples: list[Sample | None], starts: list[int]) -> MicroBatch:
    """Advantages and rollout log-probs on the response tokens; `starts` = each sample's first
    response-token position in its row (flattened index for packed rows)."""
    adv = torch.zeros_like(mb.loss_mask)
    rollout = torch.zeros_like(mb.loss_mask)
    for i, (s, start) in enumerate(zip(samples, starts)):
        if s is None or not s.response_ids:
            continue
        row = 0 if mb.packed else i
        n = len(s.response_ids)
        adv[row, start:start + n] = s.advantage
        lps = s.rollout_logprobs[:n] + [0.0] * max(0, n - len(s.rollout_logprobs))
        rollout[row, start:start + n] = torch.tensor(lps, dtype=torch.float32)
    rewards = torch.tensor([s.reward if s else float("-inf") for s in samples], dtype=torch.float32)
    return mb.with_(advantages=adv * mb.loss_mask, rollout_logp=rollout, rewards=rewards)


def _to_micro_batch(samples: list[Sample | None], seq_length: int, pad_id: int) -> MicroBatch:
    prompts = [s.prompt_ids if s else [pad_id] for s in samples]
    responses = [s.response_ids if s else [] for s in samples]
    mb = pack_sequences(prompts, responses, pad_id=pad_id, seq_length=seq_length)
    return _fill(mb, samples, [len(p) - 1 for p in prompts])


def _to_packed_micro_batch(samples: list[Sample | None], row_length: int, pad_id: int) -> MicroBatch:
    prompts = [s.prompt_ids if s else [pad_id] for s in samples]
    responses = [s.response_ids if s else [] for s in samples]
    mb = pack_row(prompts, responses, row_length, pad_id=pad_id)
    starts, at = [], 0
    for p, r in zip(prompts, responses):
        starts.append(at + len(p) - 1)
        at += len(p) + len(r)
    return _fill(mb, samples, starts)


def build_minibatches(table: RolloutTable, plans: list[MiniBatchPlan], samples: dict[int, Sample], dp_rank: int,
                      pad_id: int, max_tokens: int | None = None, seq_length: int | None = None,
                      device: torch.device | str | None = None) -> list[MiniBatch]:
    """This rank's micro-batches from the samples it received (`samples[global index]`), on `device`
    (None: the current CUDA device when there is one, else the CPU)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    if max_tokens is None:
        length = seq_length or step_seq_length(table)
    else:
        length = packed_row_length(table, plans, max_tokens)

    def make(chosen: list[Sample | None]) -> MicroBatch:
        if max_tokens is None:
            return _to_micro_batch(chosen, length, pad_id).to(device)
        return _to_packed_micro_batch(chosen, length, pad_id).to(device)
    out = []
    for p in plans:
        mine = [make([samples[i] if i is not None else None for i in mb]) for mb in p.ranks[dp_rank]]
        out.append(MiniBatch(mine, [table.response_lens[i] for i in p.samples], [table.rewards[i] for i in p.samples]))
    return out


def split_minibatches(groups: list[list[Sample]], prompts_per_minibatch: int, dp_rank: int, dp_size: int,
                      micro_batch_size: int, pad_id: int, seq_length: int | None = None,
                      max_tokens: int | None = None) -> list[MiniBatch]:
    """The same as the training loop's plan + build, from groups this rank already holds."""
    table = RolloutTable.from_groups(groups)
    plans = plan_minibatches(table, prompts_per_minibatch, dp_size, micro_batch_size, max_tokens)
    flat = dict(enumerate(s for g in groups for s in g))
    return build_minibatches(table, plans, flat, dp_rank, pad_id, max_tokens, seq_length)
