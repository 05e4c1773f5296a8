"""One policy update (an optimizer step over a mini-batch) with ERC, on megatron's schedule.

Per step, the collectives this module adds are exactly two: the step statistics packed into one
all_reduce(SUM) and one all_reduce(MAX) over the whole world. Only the ranks holding the loss (last
pipeline stage, tensor-parallel rank 0: one per data-parallel replica) contribute values, the others
add identities, so the result equals the data-parallel reduction on the last stage while every rank
learns it, including the "non-finite loss or entropy" flag that decides, identically everywhere,
whether the optimizer steps. The token-mean denominators come from the caller, computed once per
mini-batch from the response lengths and rewards every rank already holds (`denominators_from_lengths`;
`minibatch_denominators` gives the same from padded masks), so they cost nothing. Packed micro-batches
are unpacked into per-sequence rows before the loss (`unpack_for_loss`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from erc_megatron.algo import (PolicyLossConfig, StepStats, aggregation_denominator, policy_loss,
                               positive_nll_denominator, positive_nll_loss, reduce_step_metrics)
from erc_megatron.comm.profiler import comm_phase
from erc_megatron.train.batch import MicroBatch, unpack, unpack_index
from erc_megatron.train.step import (LogitsConfig, forward_backward, optimizer_step, prepare_output,
                                     token_logprob_entropy, zero_grads)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Denominators:
    """Global normalisers of one mini-batch (all micro-batches of all data-parallel ranks)."""

    policy: float
    nll: float
    max_reward: float | None = None


def minibatch_denominators(all_micro_batches: list[MicroBatch], agg: str, with_nll: bool) -> Denominators:
    """From the WHOLE mini-batch (every data-parallel rank's micro-batches): no collective needed."""
    policy = sum(float(aggregation_denominator(mb.loss_mask, agg)) for mb in all_micro_batches)
    if not with_nll:
        return Denominators(policy, 0.0)
    rewards = torch.cat([mb.rewards for mb in all_micro_batches])
    best = float(rewards.max())
    nll = sum(float(positive_nll_denominator(mb.loss_mask, mb.rewards, best)) for mb in all_micro_batches)
    return Denominators(policy, nll, best)


def denominators_from_lengths(response_lens: list[int], rewards: list[float], agg: str, with_nll: bool
                              ) -> Denominators:
    """The same numbers as `minibatch_denominators`, from the mini-batch's response lengths and
    rewards alone (what every rank holds without the token ids): the masks are rebuilt as
    [sequences, longest response] rows, which is all the denominators look at."""
    longest = max(response_lens, default=0)
    mask = (torch.arange(longest).unsqueeze(0) < torch.tensor(response_lens, dtype=torch.long).unsqueeze(1)).float()
    policy = float(aggregation_denominator(mask, agg))
    if not with_nll:
        return Denominators(policy, 0.0)
    rewards_t = torch.tensor(rewards, dtype=torch.float32)
    best = float(rewards_t.max())
    return Denominators(policy, float(positive_nll_denominator(mask, rewards_t, best)), best)


def unpack_for_loss(logp: torch.Tensor, entropy: torch.Tensor, mb: MicroBatch):
    """Packed [1, s] per-token values -> [sequences, longest] rows, and a padded-layout micro-batch."""
    index = unpack_index(mb.seq_lengths)

    def rows(t):
        return None if t is None else unpack(t, mb.seq_lengths, index)

    padded = mb.with_(loss_mask=rows(mb.loss_mask), advantages=rows(mb.advantages), old_logp=rows(mb.old_logp),
                      old_entropy=rows(mb.old_entropy), rollout_logp=rows(mb.rollout_logp), seq_lengths=None,
                      tokens=None, labels=None)
    return rows(logp), rows(entropy), padded


# which per-micro-batch metrics, if not finite, make every rank skip the optimizer step
_NONFINITE_CHECKS = {"nonfinite_loss": ("loss", "pg_loss_sum", "pos_nll_sum"),
                     "nonfinite_entropy": ("entropy_sum", "old_entropy_sum")}


def _loss_holder(layout) -> bool:
    return layout.is_last_stage and layout.tp.rank == 0


def _identity_metrics(loss_cfg: PolicyLossConfig, with_nll: bool) -> list[dict]:
    """The same metric names a real micro-batch yields, with values that change no reduction."""
    z = torch.zeros(1, 1, dtype=torch.float32)
    out = [policy_loss(z, z, z, z, entropy=z, old_entropy=z if loss_cfg.erc else None, config=loss_cfg,
                       rollout_log_prob=z if loss_cfg.tis_cap > 0 else None, global_denominator=1.0)[1]]
    if with_nll:
        out.append(positive_nll_loss(z, z, torch.zeros(1), 1.0, global_denominator=1.0)[1])
    return out


def update_policy(learner, micro_batches: list[MicroBatch], denominators: Denominators, loss_cfg: PolicyLossConfig,
                  logits_cfg: LogitsConfig, nll_coef: float = 0.0, extra_metrics: dict[str, float] | None = None,
                  layout=None) -> dict[str, float]:
    """Forward+backward over this rank's micro-batches, one optimizer step (skipped if any rank saw a
    non-finite loss or entropy), and the step's global statistics (identical on every rank).
    `layout`: erc_megatron.dist.ParallelLayout (None: the one init_distributed made)."""
    from erc_megatron.dist import current_layout

    layout = layout or current_layout()
    vocab = learner.model_config.vocab_size
    with_nll = nll_coef > 0

    def loss_fn(logits: torch.Tensor, mb: MicroBatch):
        logp, entropy = token_logprob_entropy(logits, mb.labels, vocab, logits_cfg,
                                              entropy_grad=loss_cfg.entropy_coef > 0, model=learner.model,
                                              layout=layout)
        if mb.packed:
            # per-sequence rows: the seq-mean aggregations, GSPO and the per-sequence statistics
            # see sequences, not packed rows
            logp, entropy, mb = unpack_for_loss(logp, entropy, mb)
        loss, metrics = policy_loss(logp, mb.old_logp, mb.advantages, mb.loss_mask, entropy=entropy,
                                    old_entropy=mb.old_entropy, config=loss_cfg, rollout_log_prob=mb.rollout_logp,
                                    global_denominator=denominators.policy)
        out = [metrics]
        if with_nll:
            nll, nll_metrics = positive_nll_loss(logp, mb.loss_mask, mb.rewards, denominators.max_reward,
                                                 global_denominator=denominators.nll)
            loss = loss + nll_coef * nll
            out.append(nll_metrics)
        return loss, {"metrics": out}

    prepare_output(learner.model, logits_cfg, layout)
    zero_grads(learner)
    shape = list(micro_batches[0].tokens.shape) if micro_batches else None
    with comm_phase("forward_backward", micro_batches=len(micro_batches), micro_batch_shape=shape):
        outputs = forward_backward(learner.model, micro_batches, loss_fn, layout)

    stats = StepStats()
    holder = _loss_holder(layout)
    per_mb = [o["metrics"] for o in outputs] if holder else []
    for metric_list in per_mb or [_identity_metrics(loss_cfg, with_nll)]:
        for m in metric_list:
            stats.add(m)
    # two flags, so the skip names its cause; they ride in the same all_reduce(MAX) as the stats
    flags = dict.fromkeys(_NONFINITE_CHECKS, 0.0)
    if holder:
        for metric_list in per_mb:
            for m in metric_list:
                for flag, keys in _NONFINITE_CHECKS.items():
                    if any(key in m and not math.isfinite(float(m[key])) for key in keys):
                        flags[flag] = 1.0
    for flag, value in flags.items():
        stats.add_scalar(flag, value, "max")
    for name, value in (extra_metrics or {}).items():
        stats.add_scalar(name, value, "max")  # already global (every rank holds the same value)
    group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    with comm_phase("statistics", role="statistics"):
        metrics = reduce_step_metrics(stats, group)

    causes = [flag.removeprefix("nonfinite_") for flag in _NONFINITE_CHECKS if metrics.pop(flag, 0.0) > 0]
    skip = bool(causes)
    if skip:
        log.warning("optimizer step skipped: non-finite %s on some rank; weights, optimizer state and LR "
                    "schedule left untouched", " and ".join(causes))
    lr = learner.optimizer.param_groups[0]["lr"]
    with comm_phase("optimizer"):
        updated, grad_norm = optimizer_step(learner, skip=skip)
    if updated and not math.isfinite(grad_norm):
        log.warning("gradient norm is %s", grad_norm)
    metrics.update(grad_norm=grad_norm, updated=float(updated), skipped=float(skip),
                   lr=lr)
    return metrics
