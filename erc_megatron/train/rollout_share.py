"""Hand the step's rollout from rank 0 to the learner ranks as compact tensors, each rank its share.

Rank 0 collects the rollout (a function it alone runs); the others need only the token ids and
rollout log-probs of the samples in THEIR data-parallel rank's micro-batches, plus a few numbers per
sample that every rank needs for the plan and the global denominators. Three collectives per step:
  1. broadcast_object_list of (metrics, rank 0's error if any, group sizes): small, and the way a
     rank-0 failure reaches every rank before any tensor collective (no rank hangs);
  2. broadcast of the table [samples, 4] float64: prompt length, response length, reward, advantage;
  3. scatter of int32 payloads: to every rank its data-parallel rank's samples (ranks of one
     replica get the same), token ids then the float32 bits of the rollout log-probs, padded to the
     longest share.
Rank 0 pickles nothing of the samples (a pickled step is Python objects for every token id and
log-prob, plus response texts and per-sample metrics the learner does not read).
Every rank derives the same plan from the table (minibatch.plan_minibatches), so it knows which
samples it gets and how long its payload is without being told.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from erc_megatron.rollout.collect import Sample
from erc_megatron.train.minibatch import MiniBatchPlan, RolloutTable, samples_of_rank

PlanFn = Callable[[RolloutTable], "list[MiniBatchPlan]"]


@dataclass
class StepShare:
    """What one rank holds of a step's rollout."""

    table: RolloutTable  # every sample's lengths / reward / advantage
    plans: list[MiniBatchPlan]  # the mini-batch plan (identical on every rank)
    samples: dict[int, Sample]  # this rank's samples by global index (token ids and rollout log-probs)


def _table_tensor(table: RolloutTable) -> torch.Tensor:
    return torch.tensor([table.prompt_lens, table.response_lens, table.rewards, table.advantages],
                        dtype=torch.float64).T.contiguous()


def _table_from_tensor(t: torch.Tensor, group_sizes: list[int]) -> RolloutTable:
    cols = t.T.tolist()
    return RolloutTable([int(x) for x in cols[0]], [int(x) for x in cols[1]], cols[2], cols[3], list(group_sizes))


def payload_length(table: RolloutTable, indices: list[int]) -> int:
    return sum(table.prompt_lens[i] + 2 * table.response_lens[i] for i in indices)


def encode_share(flat: list[Sample], indices: list[int]) -> torch.Tensor:
    """int32 [sum(prompt + 2 x response)]: the samples' token ids (prompt then response, sample after
    sample), then their responses' rollout log-probs as float32 bits (missing ones are 0, as the
    padded micro-batch would hold). Built from two flat lists: one tensor call each."""
    ids: list[int] = []
    lps: list[float] = []
    for i in indices:
        s = flat[i]
        n = len(s.response_ids)
        ids += s.prompt_ids
        ids += s.response_ids
        lps += s.rollout_logprobs[:n]
        lps += [0.0] * max(0, n - len(s.rollout_logprobs))
    return torch.cat([torch.tensor(ids, dtype=torch.int32), torch.tensor(lps, dtype=torch.float32).view(torch.int32)])


def decode_share(payload: torch.Tensor, table: RolloutTable, indices: list[int]) -> dict[int, Sample]:
    """Inverse of encode_share, with reward and advantage from the table."""
    group_of = [g for g, size in enumerate(table.group_sizes) for _ in range(size)]
    n_ids = sum(table.prompt_lens[i] + table.response_lens[i] for i in indices)
    ids = payload[:n_ids].tolist()
    lps = payload[n_ids:].view(torch.float32).tolist()
    out, at, at_lp = {}, 0, 0
    for i in indices:
        p, r = table.prompt_lens[i], table.response_lens[i]
        out[i] = Sample(ids[at:at + p], ids[at + p:at + p + r], "", "", table.rewards[i], lps[at_lp:at_lp + r], "",
                        group_of[i], advantage=table.advantages[i])
        at += p + r
        at_lp += r
    return out


class RolloutShare:
    """Built once at start-up on every rank: learns which data-parallel rank each rank is (one
    all_gather), then `share(fn)` per step."""

    def __init__(self, dp_rank: int, dp_size: int, plan_fn: PlanFn, group: dist.ProcessGroup | None = None):
        self.dp_rank, self.dp_size, self.plan_fn = dp_rank, dp_size, plan_fn
        self.group = group
        self.distributed = dist.is_initialized() and dist.get_world_size(group) > 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.dp_of_rank = [dp_rank]
        # NCCL moves CUDA tensors only (broadcast_object_list does this move by itself)
        nccl = self.distributed and dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        if self.distributed:
            mine = torch.tensor([dp_rank], dtype=torch.int64, device=self.device)
            every = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(every, mine, group=group)
            self.dp_of_rank = [int(t) for t in every]
            if sorted(set(self.dp_of_rank)) != list(range(dp_size)):
                raise RuntimeError(f"data-parallel ranks of the world {self.dp_of_rank} do not cover "
                                   f"0..{dp_size - 1}")

    def share(self, fn: Callable[[], tuple[list[list[Sample]], dict]]) -> tuple[StepShare | None, dict]:
        """Run `fn` (-> groups, metrics) on rank 0; every rank gets (its StepShare or None when there
        are no groups, the metrics). If `fn` raises on rank 0, every rank raises with its message."""
        metrics, error, header, table_t, payloads, plans = {}, None, None, None, None, None
        if self.rank == 0:
            try:
                groups, metrics = fn()
                table = RolloutTable.from_groups(groups)
                header = table.group_sizes
                if len(table):
                    table_t = _table_tensor(table)
                    plans = self.plan_fn(table)
                    flat = [s for g in groups for s in g]
                    payloads = [encode_share(flat, samples_of_rank(plans, d)) for d in range(self.dp_size)]
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are told
                error = exc
        if self.distributed:
            box = [(metrics, None if error is None else f"{type(error).__name__}: {error}", header)]
            dist.broadcast_object_list(box, src=0, group=self.group)
            metrics, message, header = box[0]
        else:
            message = None
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"rank 0 failed, stopping: {message}")
        n = sum(header)
        if n == 0:
            return None, metrics
        if self.distributed:
            table_t = torch.zeros(n, 4, dtype=torch.float64) if table_t is None else table_t
            table_t = table_t.to(self.device)
            dist.broadcast(table_t, src=0, group=self.group)
            table_t = table_t.cpu()
        table = _table_from_tensor(table_t, header)
        plans = plans if plans is not None else self.plan_fn(table)
        lengths = [payload_length(table, samples_of_rank(plans, d)) for d in range(self.dp_size)]
        mine = samples_of_rank(plans, self.dp_rank)
        if self.distributed:
            longest = max(lengths)
            out = torch.zeros(longest, dtype=torch.int32, device=self.device)
            scatter_list = None
            if self.rank == 0:
                padded = [torch.cat([p, p.new_zeros(longest - p.numel())]).to(self.device) for p in payloads]
                scatter_list = [padded[d] for d in self.dp_of_rank]
            dist.scatter(out, scatter_list, src=0, group=self.group)
            payload = out[:lengths[self.dp_rank]].cpu()
        else:
            payload = payloads[self.dp_rank]
        return StepShare(table, plans, decode_share(payload, table, mine)), metrics


def rollout_share(trainer_cfg, dp_rank: int, dp_size: int) -> RolloutShare:
    """The training loop's RolloutShare: plans by trainer.prompts_per_minibatch, micro_batch_size and
    max_tokens_per_micro_batch (collective: call on every rank at the same point)."""
    from functools import partial

    from erc_megatron.train.minibatch import plan_minibatches

    plan = partial(plan_minibatches, prompts_per_minibatch=trainer_cfg.prompts_per_minibatch, dp_size=dp_size,
                   micro_batch_size=trainer_cfg.micro_batch_size, max_tokens=trainer_cfg.max_tokens_per_micro_batch)
    return RolloutShare(dp_rank, dp_size, plan)
