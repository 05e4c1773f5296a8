"""Vocabulary-parallel token log-probability and entropy (imports torch only, not megatron-core).

    logp, entropy = vocab_parallel_logprob_entropy(logits, target, tp_group, temperature=tau)
    logp, entropy = fused_linear_logprob_entropy(hidden, output_weight, target, tp_group, temperature=tau)

Contract (both functions):
- Vocabulary layout as megatron's VocabParallel layers: with `tp` ranks in `tp_group`, group rank r
  holds global ids [r * V/tp, (r + 1) * V/tp). Every rank passes the same rows and the same shard
  size (unequal shards are the caller's error and are not detected). `tp_group=None` means no
  tensor parallelism and no communication (it does NOT mean the default group; code that holds an
  erc_megatron.dist.ParallelLayout passes `layout.tp.group if layout.tp.size > 1 else None`).
- `target` holds global token ids in [0, vocab_size), integer dtype, shaped like the rows.
- `vocab_size` is the real vocabulary; ids >= vocab_size (megatron's padding) take no part in the
  max, the sums or the gradient (their gradient is exactly 0). None = no padding.
- z = logits / temperature; logp = log_softmax(z)[target];
  entropy = logsumexp(z) - sum_v softmax(z)_v z_v over the whole real vocabulary.
  Computed in float32 for fp32/bf16/fp16 inputs and in float64 for float64 inputs; the outputs
  have that dtype and the shape of `target`. Logits must be finite.
- Communication: exactly ONE collective (an all-gather of 4 numbers per row) in forward; none in
  backward for the logits op; one all-reduce of the hidden-state gradient for the fused op.
- Inputs are never modified (megatron's vocab_parallel_cross_entropy writes into its logits).
- `entropy_grad=False` (default): the entropy is returned detached and nothing is saved for it;
  True: gradients flow through both outputs.
- Memory: forward and backward work chunk by chunk over rows; besides the saved inputs and the
  returned gradients, work memory is a few [chunk, V/tp] buffers and O(rows) statistics.
"""
from .fused_linear_logprob_entropy import fused_linear_logprob_entropy
from .logprob_entropy import vocab_parallel_logprob_entropy

__all__ = ["fused_linear_logprob_entropy", "vocab_parallel_logprob_entropy"]
