"""SGLang's `serialized_named_tensors` payload of `/update_weights_from_tensor` (colocated mode).

Wire format, checked against SGLang 0.5.23 (`sglang.srt.utils.common.MultiprocessingSerializer`
and `UpdateWeightsFromTensorReqInput`): each entry (one per SGLang TP rank) is a pickle made by
`multiprocessing.reduction.ForkingPickler` of a list of (name, tensor) tuples, base64-encoded
for HTTP. The pickle carries no tensor bytes: torch's multiprocessing reductions send a handle
to shared memory (CUDA IPC on GPU; on CPU, with the `file_system` sharing strategy used here, a
shared-memory segment name), so sender and server must run on the same machine.

The sender keeps the tensors alive until the server has answered (the server copies them out).

Receiving: a pickle from the network can run any code, so the embedded server never uses a plain
unpickler. `RestrictedUnpickler` admits exactly the globals torch's reduction of a CPU tensor
in a `file_system` shared-memory segment needs (the three rebuild functions, `torch.Tensor`,
`torch.storage.UntypedStorage`, `torch.Size`, torch dtype objects) and refuses anything else,
naming it, before it is called. The decoded object must then be a list of (str, CPU tensor).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import io
import pickle

import torch
import torch.multiprocessing as torch_mp
from multiprocessing.reduction import ForkingPickler

_REBUILDS = {("torch.multiprocessing.reductions", n)
             for n in ("rebuild_tensor", "rebuild_typed_storage", "rebuild_storage_filename",
                       "rebuild_storage_empty")}
_CLASSES = {("torch", "Tensor"), ("torch", "Size"), ("torch.storage", "UntypedStorage")}


class PayloadError(ValueError):
    """A serialized_named_tensors entry that is not a list of (name, CPU tensor) we may decode."""


class RestrictedUnpickler(pickle.Unpickler):
    """Only what torch's shared-memory reduction of CPU tensors references; nothing else is looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) in _REBUILDS or (module, name) in _CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise PayloadError(f"serialized_named_tensors refers to {module}.{name}, which is not allowed: only CPU "
                           "tensors in shared memory (torch's file_system sharing strategy) are accepted")


def decode_named_tensors(entry: str | bytes) -> list[tuple[str, torch.Tensor]]:
    """One serialized_named_tensors entry (base64 text or raw pickle bytes) -> [(name, tensor)]."""
    if isinstance(entry, str):
        try:
            entry = base64.b64decode(entry, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PayloadError(f"serialized_named_tensors entry is not base64: {exc}") from exc
    if not isinstance(entry, (bytes, bytearray)):
        raise PayloadError(f"serialized_named_tensors entries must be base64 strings, got {type(entry).__name__}")
    try:
        obj = RestrictedUnpickler(io.BytesIO(entry)).load()
    except PayloadError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated pickle, a shared-memory segment that is gone, ...
        raise PayloadError(f"cannot decode serialized_named_tensors: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, list) or not all(
            isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)
            for x in obj):
        raise PayloadError("serialized_named_tensors must decode to a list of (name, tensor) tuples, got "
                           f"{type(obj).__name__}")
    return obj


@contextlib.contextmanager
def _file_system_sharing():
    # file_descriptor (Linux default) hands fds over a socket that only processes started by
    # multiprocessing from the same parent may open; a shared-memory name works for any local process
    before = torch_mp.get_sharing_strategy()
    torch_mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch_mp.set_sharing_strategy(before)


def encode_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's `MultiprocessingSerializer.serialize(named, output_str=True)` for CPU tensors.

    Tensors not yet in shared memory are moved there (in place), so pass copies of anything the
    caller will keep using, e.g. a bucket's own flat buffer.
    """
    buf = io.BytesIO()
    with _file_system_sharing():
        ForkingPickler(buf).dump([(name, t.detach()) for name, t in named])
    return base64.b64encode(buf.getvalue()).decode("ascii")
