"""Phase 2: this data-parallel rank's micro-batches, with old log-probs and entropies from a forward pass."""
from __future__ import annotations

import time

from erc_megatron.comm import comm_phase
from erc_megatron.rollout.collect import Sample
from erc_megatron.train.minibatch import MiniBatch, split_minibatches, step_seq_length
from erc_megatron.train.run import Run
from erc_megatron.train.step import old_policy_pass


def old_policy(run: Run, groups: list[list[Sample]], metrics: dict[str, float]) -> list[MiniBatch]:
    """Mini-batches of `trainer.prompts_per_minibatch` groups; each rank's `mine` get old_logp / old_entropy."""
    cfg, layout = run.cfg, run.layout
    t0 = time.perf_counter()
    minibatches = split_minibatches(groups, cfg.trainer.prompts_per_minibatch, layout.dp.rank, layout.dp.size,
                                    cfg.trainer.micro_batch_size, run.pad_id, step_seq_length(groups))
    flat = [mb for m in minibatches for mb in m.mine]
    with comm_phase("old_policy", micro_batches=len(flat), micro_batch_shape=list(flat[0].tokens.shape)):
        with_old = old_policy_pass(run.learner.model, flat, run.model_cfg.vocab_size, cfg.logits, layout)
    i = 0
    for m in minibatches:
        m.mine = with_old[i:i + len(m.mine)]
        i += len(m.mine)
    metrics["time/old_policy"] = time.perf_counter() - t0
    return minibatches
