"""Phase 2: this data-parallel rank's micro-batches, with old log-probs and entropies from a forward pass."""
from __future__ import annotations

import time

from erc_megatron.comm import comm_phase
from erc_megatron.train.minibatch import MiniBatch, build_minibatches
from erc_megatron.train.rollout_share import StepShare
from erc_megatron.train.run import Run
from erc_megatron.train.step import old_policy_pass


def old_policy(run: Run, share: StepShare, metrics: dict[str, float]) -> list[MiniBatch]:
    """Mini-batches of `trainer.prompts_per_minibatch` groups (padded, or packed to
    `trainer.max_tokens_per_micro_batch`); each rank's `mine` get old_logp / old_entropy."""
    cfg, layout = run.cfg, run.layout
    t0 = time.perf_counter()
    minibatches = build_minibatches(share.table, share.plans, share.samples, layout.dp.rank, run.pad_id,
                                    cfg.trainer.max_tokens_per_micro_batch)
    flat = [mb for m in minibatches for mb in m.mine]
    with comm_phase("old_policy", micro_batches=len(flat), micro_batch_shape=list(flat[0].tokens.shape)):
        with_old = old_policy_pass(run.learner.model, flat, run.model_cfg.vocab_size, cfg.logits, layout)
    i = 0
    for m in minibatches:
        m.mine = with_old[i:i + len(m.mine)]
        i += len(m.mine)
    metrics["time/old_policy"] = time.perf_counter() - t0
    return minibatches
