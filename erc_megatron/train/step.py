"""Forward-only (old policy) and training passes on megatron-core's own pipeline schedule.

The loss lives on the last pipeline stage. Token-mean aggregation uses a global denominator that
the caller computes once per mini-batch from the batch's lengths before the schedule runs (every
rank holds the whole mini-batch's lengths, so it costs no collective); each micro-batch then
contributes sum(m*l) / N_global, rescaled here for megatron's averaging (the schedule divides by
the number of micro-batches, DDP averages over data-parallel ranks).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from collections.abc import Callable

import torch

from erc_megatron.train.batch import MicroBatch


@dataclass
class LogitsConfig:
    """How per-token log-probs and entropies are taken from the vocab-parallel logits."""

    temperature: float = 1.0
    """Rollout temperature; logits are divided by it before anything else."""
    chunk_size: int | None = None
    """Rows per chunk in the log-prob/entropy op (bounds its extra memory)."""
    fused_output_layer: bool = False
    """Fuse the output layer into the op: the [tokens, V/tp] logits are never materialised."""

    def __post_init__(self) -> None:
        from erc_megatron.model.config import ConfigError

        if self.temperature <= 0:
            raise ConfigError(f"logits.temperature must be > 0, got {self.temperature}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"logits.chunk_size must be >= 1 or null, got {self.chunk_size}")


def _layout(layout):
    """`layout`, or the one erc_megatron.dist.init_distributed made when the caller passes None."""
    from erc_megatron.dist import current_layout

    return layout or current_layout()


def _tp_group(layout):
    # the ops' spelling: None = the vocabulary is not split (no collective)
    layout = _layout(layout)
    return layout.tp.group if layout.tp.size > 1 else None


def prepare_output(model, cfg: LogitsConfig, layout=None) -> None:
    """With fused_output_layer, the last stage's model returns hidden states instead of logits."""
    if cfg.fused_output_layer and _layout(layout).is_last_stage:
        from erc_megatron.patches.megatron_fused_output import install_fused_output
        from erc_megatron.weights.rank_params import unwrap_model

        install_fused_output(unwrap_model(model))


def token_logprob_entropy(output: torch.Tensor, labels: torch.Tensor, vocab_size: int, cfg: LogitsConfig,
                          entropy_grad: bool = False, model=None, layout=None):
    """Per-token log-prob and entropy from the last stage's output: vocab-parallel logits, or, with
    fused_output_layer, hidden states multiplied chunk by chunk with the output weight shard."""
    if cfg.fused_output_layer:
        from erc_megatron.ops import fused_linear_logprob_entropy
        from erc_megatron.patches.megatron_fused_output import output_weight
        from erc_megatron.weights.rank_params import unwrap_model

        return fused_linear_logprob_entropy(output, output_weight(unwrap_model(model)), labels,
                                            tp_group=_tp_group(layout), temperature=cfg.temperature,
                                            chunk_size=cfg.chunk_size or 1024, entropy_grad=entropy_grad,
                                            vocab_size=vocab_size)
    from erc_megatron.ops import vocab_parallel_logprob_entropy

    return vocab_parallel_logprob_entropy(output, labels, tp_group=_tp_group(layout), temperature=cfg.temperature,
                                          chunk_size=cfg.chunk_size, entropy_grad=entropy_grad,
                                          vocab_size=vocab_size)


def packed_seq_params(mb: MicroBatch):
    """THD PackedSeqParams of a packed row (Transformer Engine's attention reads cu_seqlens; the
    trailing pad run is its own segment, so no sequence attends to it)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from erc_megatron.train.batch import packed_cu_seqlens

    cu = packed_cu_seqlens(mb.seq_lengths, mb.tokens.shape[1]).to(mb.tokens.device)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def _model_forward(mb: MicroBatch, model):
    if not mb.packed:
        return model(mb.tokens, mb.position_ids, attention_mask=None)
    from erc_megatron.model.gpt import have_transformer_engine

    if have_transformer_engine():
        return model(mb.tokens, mb.position_ids, attention_mask=None, packed_seq_params=packed_seq_params(mb))
    # local spec: block-diagonal causal mask and per-sequence RoPE positions, the same numbers
    from erc_megatron.patches.megatron_packed_rope import packed_positions
    from erc_megatron.train.batch import packed_attention_mask
    from erc_megatron.weights.rank_params import unwrap_model

    positions = mb.position_ids
    mask = packed_attention_mask(mb.seq_lengths, mb.tokens.shape[1]).to(mb.tokens.device)
    with packed_positions(unwrap_model(model), positions):
        return model(mb.tokens, positions, attention_mask=mask)


def _forward_only_loss(mb: MicroBatch, vocab_size: int, cfg: LogitsConfig, model, layout, logits: torch.Tensor):
    logp, entropy = token_logprob_entropy(logits, mb.labels, vocab_size, cfg, model=model, layout=layout)
    return logits.new_zeros(()), {"logp": logp.detach() * mb.loss_mask, "entropy": entropy.detach() * mb.loss_mask}


def run_schedule(model, micro_batches: list[MicroBatch], forward_step: Callable, forward_only: bool) -> list:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    b, s = micro_batches[0].tokens.shape
    for i, mb in enumerate(micro_batches):
        if tuple(mb.tokens.shape) != (b, s):
            raise ValueError(f"micro-batch {i} has shape {tuple(mb.tokens.shape)}, expected {(b, s)}: "
                             "the pipeline schedule needs equal shapes")
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=b, forward_only=forward_only)


@torch.no_grad()
def old_policy_pass(model, micro_batches: list[MicroBatch], vocab_size: int, cfg: LogitsConfig,
                    layout=None) -> list[MicroBatch]:
    """Forward-only pass giving old_logp and old_entropy per response token (0 elsewhere).

    Returns the micro-batches with those fields filled on the last pipeline stage; other stages
    get them back unchanged (the loss, which needs them, runs on the last stage only). `layout`:
    erc_megatron.dist.ParallelLayout (None: the one init_distributed made).
    """
    layout = _layout(layout)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        return _model_forward(mb, model), partial(_forward_only_loss, mb, vocab_size, cfg, model, layout)

    prepare_output(model, cfg, layout)
    model.eval()
    try:
        outputs = run_schedule(model, micro_batches, forward_step, forward_only=True)
    finally:
        model.train()
    if not layout.is_last_stage:
        return micro_batches
    return [mb.with_(old_logp=o["logp"], old_entropy=o["entropy"]) for mb, o in zip(micro_batches, outputs)]


LossFn = Callable[[torch.Tensor, MicroBatch], "tuple[torch.Tensor, dict]"]



def forward_backward(model, micro_batches: list[MicroBatch], loss_fn: LossFn, layout=None) -> list:
    """Run forward+backward over all micro-batches; returns the last stage's per-micro-batch dicts.

    `loss_fn(logits, mb)` must return (loss already divided by the GLOBAL denominator, metrics).
    """
    n = len(micro_batches)
    dp = _layout(layout).dp.size

    def _loss(mb, logits):
        loss, metrics = loss_fn(logits, mb)
        # undo the schedule's 1/num_microbatches and DDP's 1/dp: the global denominator already
        # normalises over every micro-batch of every data-parallel rank
        return loss * (n * dp), metrics

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        return _model_forward(mb, model), partial(_loss, mb)

    return run_schedule(model, micro_batches, forward_step, forward_only=False)


def optimizer_step(learner, skip: bool) -> tuple[bool, float]:
    """Step (or skip, keeping the weights untouched) and advance the LR schedule when stepping."""
    if skip:
        learner.optimizer.zero_grad()
        return False, float("nan")
    updated, grad_norm, _ = learner.optimizer.step()
    if updated:
        learner.scheduler.step(increment=1)
    return bool(updated), float(grad_norm) if grad_norm is not None else float("nan")


def zero_grads(learner) -> None:
    learner.model.zero_grad_buffer()
    learner.optimizer.zero_grad()

