"""CPU / gloo fixes for megatron-core's MoE layers (router, all-to-all token dispatcher).

Checked against megatron-core 0.16.1 (Python 3.11) and 0.17.1, 0.18.2, 0.19.2 (Python 3.12), each
run here on CPU/gloo with the local layer spec (SequentialMLP experts) at EP2/EP4 x TP1/TP2 and PP2
(tests/model/test_moe_distributed.py, tests/model/test_moe_config.py; on 0.16.1 and 0.19.2 also
the EP2 training run, tests/train/test_moe_train_e2e.py, and a forward-backward per load-balancing
type, aux_loss / seq_aux_loss / global_aux_loss / none, with both dispatchers: same gradients on
both). The Python 3.12 subset (tests/run_py312.sh) runs the MoE tests on 0.19.2. Fixes 1-3 are
needed on every one of these versions; fix 4 only on 0.16.x (0.17 and later set te_general_gemm
to None themselves without TE).
Applied only when CUDA is absent, after `megatron_cpu.apply_cpu_patches`. Each fix rewrites one
construct inside one upstream function (see `source_rewrite`) after checking it is still there, so
a changed upstream fails at start-up naming the function.

Fixes:
 1. Router: `TopKRouter.gating` moves a CPU weight to `torch.cuda.current_device()` (it expects
    a CPU-initialised model on a GPU); its buffers for expert bias / global aux loss are
    allocated there too.
 2. All-to-all dispatcher: a class-wide side `torch.cuda.Stream()` for the device-to-host copy
    of the split sizes, and `torch.cuda.stream` / `current_stream` / `record_event` around that
    copy. On CPU the sizes are already on the host, so the stream is a synchronous stand-in. The
    copy (`maybe_move_tensor_to_cpu`) turns the split sizes into numpy arrays only for CUDA
    tensors; `all_to_all_single` takes sequences of ints and refuses a CPU torch tensor, so on
    CPU the split sizes become numpy arrays too, as they are on a GPU.
 3. `tensor_parallel.mappings._AllToAll.forward` (the all-to-all-v under every EP dispatch) allocates
    its output on `torch.cuda.current_device()`.
 4. Without Transformer Engine `moe_utils.te_general_gemm` is never defined (its import sits in
    the `try` that sets HAVE_TE) but `RouterGatingLinearFunction` tests it against None: it is
    set to None, so the router takes its torch.mm path. Needed on a GPU without TE as well.
"""
from __future__ import annotations

import importlib
import logging

import torch

from .source_rewrite import Rewrite, UpstreamChangedError, rewrite_function

CHECKED = "megatron-core 0.16.1, 0.17.1, 0.18.2, 0.19.2 (MoE on CPU, local spec, all run)"
log = logging.getLogger(__name__)

_CURRENT_DEVICE = Rewrite("torch.cuda.current_device()", '"cpu"')
_applied = False


class _HostStream:
    """Stands in for a CUDA stream (and its recorded event) where all work is synchronous."""

    def wait_stream(self, other) -> None:
        return None

    def record_event(self) -> _HostStream:
        return self

    def synchronize(self) -> None:
        return None

    def __enter__(self) -> _HostStream:
        return self

    def __exit__(self, *exc) -> bool:
        return False


_HOST_STREAM = _HostStream()


def _host_stream(*_args) -> _HostStream:
    return _HOST_STREAM


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """`maybe_move_tensor_to_cpu` for tensors already on the host: numpy where asked, as on a GPU."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _patch_router() -> None:
    router = importlib.import_module("megatron.core.transformer.moe.router")
    rewrite_function(router.Router, "gating", [_CURRENT_DEVICE], CHECKED)
    rewrite_function(router.TopKRouter, "__init__", [_CURRENT_DEVICE], CHECKED)


def _patch_dispatcher() -> None:
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    cls = dispatcher.MoEAlltoAllTokenDispatcher
    rewrite_function(cls, "__init__", [Rewrite("torch.cuda.Stream()", "_erc_host_stream()")], CHECKED)
    rewrite_function(cls, "_maybe_dtoh_and_synchronize", [
        Rewrite("torch.cuda.current_stream()", "_erc_host_stream()"),
        Rewrite("torch.cuda.stream(self.cuda_dtoh_stream)", "_erc_host_stream(self.cuda_dtoh_stream)"),
        Rewrite("maybe_move_tensor_to_cpu(", "_erc_host_copy("),
    ], CHECKED)
    dispatcher._erc_host_stream = _host_stream
    dispatcher._erc_host_copy = _host_copy


def _patch_missing_te_gemm() -> None:
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if hasattr(moe_utils, "te_general_gemm"):  # defined either way from 0.17 (None without TE)
        return
    if getattr(moe_utils, "HAVE_TE", None) is None:
        raise UpstreamChangedError(f"megatron.core.transformer.moe.moe_utils has no HAVE_TE flag any more; "
                                   f"re-check the te_general_gemm fallback (checked {CHECKED})")
    if not moe_utils.HAVE_TE:  # 0.16.x: only the `try` that sets HAVE_TE imports it
        moe_utils.te_general_gemm = None


def _patch_all_to_all() -> None:
    mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
    rewrite_function(mappings._AllToAll, "forward", [_CURRENT_DEVICE], CHECKED)


def apply_moe_cpu_patches(force: bool = False) -> bool:
    """Apply the MoE fixes once; the CPU ones are a no-op when CUDA is available (unless forced).

    Returns True if the CPU fixes were applied.
    """
    global _applied
    _patch_missing_te_gemm()
    if _applied:
        return True
    if torch.cuda.is_available() and not force:
        return False
    from .megatron_cpu import apply_cpu_patches

    apply_cpu_patches(force=force)
    _patch_router()
    _patch_dispatcher()
    _patch_all_to_all()
    from .gloo_uneven_collectives import apply_gloo_uneven_collectives

    apply_gloo_uneven_collectives()  # the dispatchers' uneven TP gathers (see that module)
    _applied = True
    log.debug("applied megatron-core MoE CPU fixes (%s)", CHECKED)
    return True


__all__ = ["CHECKED", "apply_moe_cpu_patches"]
