"""CPU / gloo compatibility fixes for megatron-core, applied only when CUDA is absent.

Checked against megatron-core 0.16.1 (Python 3.11) and 0.17.1, 0.18.2, 0.19.2 (Python 3.12), each
run here on CPU/gloo (parallel-equivalence and end-to-end train tests; `tests/run_py312.sh`).
Each fix rewrites one construct inside one upstream function (see `source_rewrite`), after
checking that the construct is still there; if upstream changed, start-up fails with a message
naming the function instead of silently running something else.

Fixes (numbers follow shared/spec/megatron_cpu.md):
 1. RNG tracker: CUDA RNG get/set/seed -> the CPU generator.
 2. `device="cuda"` literals: schedules' `total_num_tokens`, the default causal masks,
    `weight.data.cuda()` for tied embeddings under PP.
 3. `torch.cuda.current_device()` in rotary embeddings, p2p buffers, DDP buffers, optimizers and
    the global memory buffer (attention scores).
 4. `torch.cuda.synchronize()` in p2p: avoided by `TransformerConfig(batch_p2p_sync=False)`,
    which erc_megatron.model.gpt sets on CPU.
 5. DDP / optimizer: `torch.cuda.current_stream()` in grad sync (0.19.x), the CUDA flag of
    `MegatronOptimizer.has_grad_norm_group` (0.19.x), CUDA-only buffers and asserts in gradient
    clipping (a CPU path, so `clip_grad` works on CPU).
 6. DistributedOptimizer (`parallel.use_distributed_optimizer`), and Float16OptimizerWithFloat16Params
    (bf16/fp16 without it): they tell fp32 from bf16/fp16 parameters by their CUDA type names
    (`param.type() == 'torch.cuda.FloatTensor'`), so a CPU parameter is refused; the distributed
    optimizer's `load_state_dict` allocates on the current CUDA device. Checked against 0.16.1 and
    0.19.2 (both run). Its collectives (`reduce_scatter_tensor`, `all_gather_into_tensor`, inside
    `_coalescing_manager`) run natively on gloo in torch 2.13.0 (run here), so they need no
    fallback and the communication recorder sees them as issued, at their real size.
 7. Sequence parallelism: the column/row-parallel linear's backward all-gathers its sequence-sharded
    input again into a buffer on the current CUDA device (0.16.1 and 0.19.2, run).
"""
from __future__ import annotations

import importlib
import inspect
import logging

import torch

from .source_rewrite import Rewrite, UpstreamChangedError, replace_attribute, rewrite_function

CHECKED = "megatron-core 0.16.1, 0.17.1, 0.18.2, 0.19.2 (all run on CPU)"
log = logging.getLogger(__name__)

_CUDA_DEVICE = Rewrite('device="cuda"', 'device="cpu"')
_CUDA_DEVICE_SQ = Rewrite("device='cuda'", "device='cpu'")
_CURRENT_DEVICE = Rewrite("torch.cuda.current_device()", '"cpu"')

_applied = False


def _module(name: str):
    return importlib.import_module(name)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _present(owner, name: str) -> bool:
    return hasattr(owner, name)


def _rewrite_if_contains(owner, name: str, rewrites: list[Rewrite]) -> None:
    """For constructs that exist in some supported versions only: rewrite those present."""

    if not _present(owner, name):
        return
    try:
        source = inspect.getsource(getattr(owner, name))
    except (OSError, TypeError):
        return
    present = [rw for rw in rewrites if rw.old in source]
    if present:
        rewrite_function(owner, name, present, CHECKED)


def _patch_rng() -> None:
    random = _module("megatron.core.tensor_parallel.random")
    replace_attribute(random, "_get_cuda_rng_state", _cpu_get_rng_state, ["device", "clone", "graph_safe"], CHECKED)
    replace_attribute(random, "_set_cuda_rng_state", _cpu_set_rng_state, ["new_state", "device", "graph_safe"], CHECKED)
    rewrite_function(random.CudaRNGStatesTracker, "add", [
        Rewrite("torch.cuda.get_rng_state()", "torch.get_rng_state()"),
        Rewrite("torch.cuda.manual_seed(seed)", "torch.manual_seed(seed)"),
    ], CHECKED)
    # On CPU the tracked generator is the CPU generator itself, so upstream's "CPU RNG state
    # changed within GPU RNG context" check would fire on every random op inside a fork.
    rewrite_function(random.CudaRNGStatesTracker, "fork", [
        Rewrite("torch.all(cpu_rng_state == torch.get_rng_state()).item()", "True"),
    ], CHECKED)
    rewrite_function(random, "model_parallel_cuda_manual_seed", [
        Rewrite("torch.cuda.manual_seed(data_parallel_seed)", "torch.manual_seed(data_parallel_seed)"),
    ], CHECKED)


def _patch_device_literals() -> None:
    schedules = _module("megatron.core.pipeline_parallel.schedules")
    for fn in ("forward_backward_no_pipelining", "forward_backward_pipelining_with_interleaving",
               "forward_backward_pipelining_without_interleaving"):
        rewrite_function(schedules, fn, [_CUDA_DEVICE], CHECKED)

    utils = _module("megatron.core.transformer.utils")
    rewrite_function(utils, "get_default_causal_mask", [_CUDA_DEVICE], CHECKED)
    rewrite_function(utils, "get_sliding_window_causal_mask", [_CUDA_DEVICE], CHECKED)
    fused_softmax = _module("megatron.core.fusions.fused_softmax")
    for name in ("get_default_causal_mask", "get_sliding_window_causal_mask"):
        if _present(fused_softmax, name):  # imported by name there
            setattr(fused_softmax, name, getattr(utils, name))

    language_module = _module("megatron.core.models.common.language_module.language_module")
    rewrite_function(language_module.LanguageModule, "setup_embeddings_and_output_layer",
                     [Rewrite("weight.data = weight.data.cuda()", "weight.data = weight.data")], CHECKED)


def _patch_current_device() -> None:
    rotary = _module("megatron.core.models.common.embeddings.rotary_pos_embedding")
    for cls_name in ("RotaryEmbedding", "MultimodalRotaryEmbedding"):
        cls = getattr(rotary, cls_name, None)
        if cls is None:
            continue
        for meth in ("__init__", "get_freqs_non_repeated", "get_emb", "forward"):
            if meth in vars(cls):
                _rewrite_if_contains(cls, meth, [_CURRENT_DEVICE])

    p2p = _module("megatron.core.pipeline_parallel.p2p_communication")
    owner = p2p.P2PCommunicator if _present(p2p, "P2PCommunicator") else p2p
    for meth in ("_communicate_shapes", "_communicate"):
        _rewrite_if_contains(owner, meth, [_CURRENT_DEVICE])

    buffer = _module("megatron.core.distributed.param_and_grad_buffer")
    for cls_name in ("_ParamAndGradBuffer", "_ParamAndGradBucketGroup"):
        cls = getattr(buffer, cls_name, None)
        for meth in ("__init__", "start_grad_sync", "start_param_sync", "finish_grad_sync"):
            if cls is not None and meth in vars(cls):
                _rewrite_if_contains(cls, meth, [
                    _CURRENT_DEVICE, _CUDA_DEVICE,
                    # 0.19.x waits on the current CUDA stream before async grad reduction
                    Rewrite("torch.cuda.current_stream()", "_erc_null_stream()"),
                ])
    buffer._erc_null_stream = _NullStream

    # gather / scatter helpers allocate their outputs on the current CUDA device
    mappings = _module("megatron.core.tensor_parallel.mappings")
    rewritten = 0
    for name, fn in list(vars(mappings).items()):
        if inspect.isfunction(fn) and fn.__module__ == mappings.__name__:
            try:
                src = inspect.getsource(fn)
            except OSError:
                continue
            if "torch.cuda.current_device()" in src:
                rewrite_function(mappings, name, [_CURRENT_DEVICE], CHECKED)
                rewritten += 1
    if rewritten == 0:
        raise UpstreamChangedError(f"tensor_parallel.mappings no longer allocates on torch.cuda.current_device(); "
                                   f"re-check the CPU fixes (checked {CHECKED})")

    # sequence parallelism: backward all-gathers the sequence-sharded input again for the weight
    # gradient, into a buffer on the current CUDA device (0.16.1 run, 0.19.2 source)
    layers = _module("megatron.core.tensor_parallel.layers")
    rewrite_function(layers.LinearWithGradAccumulationAndAsyncCommunication, "backward", [_CURRENT_DEVICE], CHECKED)

    core_utils = _module("megatron.core.utils")
    # the attention score buffer (DotProductAttention) is allocated on the current CUDA device
    rewrite_function(core_utils.GlobalMemoryBuffer, "get_tensor", [_CURRENT_DEVICE], CHECKED)

    optimizer = _module("megatron.core.optimizer.optimizer")
    for cls_name in ("MegatronOptimizer", "MixedPrecisionOptimizer", "Float16OptimizerWithFloat16Params",
                     "FP32Optimizer", "ChainedOptimizer"):
        cls = getattr(optimizer, cls_name, None)
        # has_grad_norm_group (0.19.x): a one-off all-reduce of a CUDA flag per grad-norm group
        for meth in ("__init__", "get_loss_scale", "_unscale_main_grads_and_check_for_nan", "has_grad_norm_group"):
            if cls is not None and meth in vars(cls):
                _rewrite_if_contains(cls, meth, [_CURRENT_DEVICE, _CUDA_DEVICE_SQ])


class _NullStream:
    """Stands in for a CUDA stream on CPU: work is synchronous."""

    def wait_stream(self, other) -> None:  # noqa: D401
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _patch_grad_clipping() -> None:
    clip = _module("megatron.core.optimizer.clip_grads")
    rewrite_function(clip, "get_grad_norm_fp32", [_CUDA_DEVICE_SQ], CHECKED)
    _rewrite_if_contains(clip, "clip_grad_by_total_norm_fp32", [
        _CUDA_DEVICE_SQ,
        Rewrite("assert param.grad.type() == 'torch.cuda.FloatTensor'", "assert param.grad.dtype == torch.float32"),
    ])
    _rewrite_if_contains(clip, "count_zeros_fp32", [_CUDA_DEVICE_SQ])
    # the torch fallback of apex's multi-tensor L2 norm (no apex on CPU) returns a CUDA tensor
    rewrite_function(_module("megatron.core.utils"), "local_multi_tensor_l2_norm", [_CUDA_DEVICE], CHECKED)


_CUDA_TYPES = [
    Rewrite("'torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor'", "'torch.HalfTensor', 'torch.BFloat16Tensor'"),
]


def _patch_distributed_optimizer() -> None:
    # bf16/fp16 models with the plain optimizer: the same CUDA type names in its master-copy set-up
    optimizer = _module("megatron.core.optimizer.optimizer")
    rewrite_function(optimizer.Float16OptimizerWithFloat16Params, "__init__", _CUDA_TYPES + [
        Rewrite("param.type() == 'torch.cuda.FloatTensor'", "param.type() == 'torch.FloatTensor'"),
    ], CHECKED_DISTOPT)
    distrib = _module("megatron.core.optimizer.distrib_optimizer")
    cls = distrib.DistributedOptimizer
    rewrite_function(cls, "_build_model_and_main_param_groups", _CUDA_TYPES + [
        Rewrite("model_param.type() == 'torch.cuda.FloatTensor'", "model_param.type() == 'torch.FloatTensor'"),
    ], CHECKED_DISTOPT)
    rewrite_function(cls, "__init__", _CUDA_TYPES, CHECKED_DISTOPT)
    rewrite_function(cls, "load_state_dict", [_CURRENT_DEVICE], CHECKED_DISTOPT)


CHECKED_DISTOPT = "megatron-core 0.16.1 and 0.19.2 (both run on CPU)"


def apply_cpu_patches(force: bool = False) -> bool:
    """Apply every CPU fix once; a no-op when CUDA is available (unless forced). Returns True if applied."""
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _patch_rng()
    _patch_device_literals()
    _patch_current_device()
    _patch_grad_clipping()
    _patch_distributed_optimizer()
    _applied = True
    log.debug("applied megatron-core CPU fixes (%s)", CHECKED)
    return True
