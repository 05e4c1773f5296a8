"""Let the loss see the last stage's hidden states and the output weight instead of logits.

With `logits.fused_output_layer`, the per-token log-prob and entropy come from
`erc_megatron.ops.fused_linear_logprob_entropy(hidden, weight, ...)`, which never materialises the
[tokens, V/tp] logits. GPTModel has no switch to stop before its output layer, so this replaces
the forward of ONE output-layer instance (a ColumnParallelLinear): it returns the hidden states
unchanged and remembers the weight GPTModel passed (the shared embedding when tied). GPTModel then
hands those hidden states, [b, s, h], to the loss function where logits would have been.

The skipped `copy_to_tensor_model_parallel_region` (identity forward, all-reduce of the input
gradient backward) is done by the fused op itself, once. Under sequence parallelism the layer's
input is a sequence shard that the layer itself would all-gather (`self.sequence_parallel`, 0.16.1):
the replacement gathers it too. Checked against megatron-core 0.16.1,
0.17.1, 0.18.2 and 0.19.2 (each run): `GPTModel._postprocess` calls
`self.output_layer(hidden_states, weight=output_weight, runtime_gather_output=...)`, verified at
install time.
"""
from __future__ import annotations

import inspect

import torch

from .source_rewrite import UpstreamChangedError

CHECKED = "megatron-core 0.16.1, 0.17.1, 0.18.2, 0.19.2"


def _check_upstream(gpt_cls) -> None:
    post = getattr(gpt_cls, "_postprocess", None)
    source = inspect.getsource(post) if post is not None else ""
    if "self.output_layer(" not in source or "weight=output_weight" not in source:
        raise UpstreamChangedError(
            f"GPTModel._postprocess no longer calls self.output_layer(hidden_states, weight=output_weight, ...); "
            f"the fused output layer must be re-checked (patch checked against {CHECKED})")


def install_fused_output(gpt_model) -> None:
    """Make `gpt_model` (last pipeline stage) return hidden states [b, s, h]; see `output_weight`."""
    from megatron.core.models.gpt import GPTModel

    _check_upstream(GPTModel)
    layer = gpt_model.output_layer
    if getattr(layer, "_erc_fused", False):
        return
    layer._erc_fused = True

    def forward(input_, weight=None, runtime_gather_output=None):
        layer._erc_weight = layer.weight if weight is None else weight
        if getattr(layer, "sequence_parallel", False):
            # the layer would all-gather its sequence-parallel input; its backward reduce-scatter is
            # the fused op's all-reduce of the hidden gradient followed by taking this rank's part
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False)
        return input_, None

    layer.forward = forward


def output_weight(gpt_model) -> torch.Tensor:
    """The vocabulary shard [V/tp, h] that the last forward of `gpt_model` would have multiplied with."""
    weight = getattr(gpt_model.output_layer, "_erc_weight", None)
    if weight is None:
        raise RuntimeError("output_weight() needs install_fused_output() and a forward pass first")
    return weight
