"""Server side of weight updates: receive Hugging Face-named tensors, validate, apply atomically.

Mirrors SGLang's model-runner handlers for `/init_weights_update_group`,
`/update_weights_from_distributed` (per-tensor broadcasts from group rank 0, or one
`flattened_bucket` broadcast), `/update_weights_from_disk` and `/destroy_weights_update_group`,
with one deliberate difference: SGLang's `load_weights` may leave a model half-updated when a
name is bad, while here every tensor of a call is received first, all names / shapes / dtypes are
validated against the model's state dict, and only then is everything copied in, between two
engine steps. A call either changes every named tensor or none.

Multi-bucket updates are atomic too: a call with `flush_cache=false` (the learner sends every
bucket but the last so) is validated and staged, and the staged tensors are copied in together
with the first call that has `flush_cache=true` (SGLang's default), or at `/flush_cache` or
`/continue_generation`. A refused call drops everything staged, so after a failed sync the model
holds all old weights, never a mix. (An SGLang server applies each call at once.)

The broadcast is received even when validation will fail (unknown name, wrong shape), so the
learner's matching broadcast completes instead of hanging; only requests that cannot be received
at all (unknown group, unparseable dtype or shape, mismatched list lengths) return before it.
"""
from __future__ import annotations

import glob
import logging
import os
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from erc_megatron.patches.custom_process_group import destroy_custom_process_group, init_custom_process_group

from .engine import Engine
from erc_megatron.rollout.flat_bucket import bucket_nbytes, unflatten_tensors

log = logging.getLogger(__name__)

LOAD_FORMATS_DISTRIBUTED = (None, "flattened_bucket")
LOAD_FORMATS_DISK = (None, "auto", "safetensors")
LOAD_FORMATS_TENSOR = (None, "direct")  # SGLang's flattened_bucket / custom loaders carry SGLang classes
BACKENDS = ("gloo", "nccl")


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' (SGLang's spelling, `getattr(torch, name)`) or 'torch.bfloat16' -> torch dtype."""
    attr = name[len("torch."):] if isinstance(name, str) and name.startswith("torch.") else name
    dtype = getattr(torch, attr, None) if isinstance(attr, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use torch dtype names such as 'bfloat16' or 'float32'")
    return dtype


class WeightUpdater:
    """Weight-update groups and atomic weight loading for one engine's model."""

    def __init__(self, engine: Engine, group_timeout: timedelta = timedelta(minutes=30)):
        self.engine = engine
        self.group_timeout = group_timeout
        self._groups: dict[str, tuple[dist.ProcessGroup, str]] = {}
        self._groups_lock = threading.Lock()
        from erc_megatron.patches.transformers_moe_experts import checkpoint_named_tensors, fused_expert_modules

        # checkpoint (SGLang) names: a MoE model's fused experts are addressed per expert
        self._fused_experts = bool(fused_expert_modules(engine.model))
        self._targets = checkpoint_named_tensors(engine.model)
        storage: dict[int, list[str]] = {}
        for name, tensor in self._targets.items():
            storage.setdefault(tensor.data_ptr(), []).append(name)
        # Names that alias one tensor, e.g. lm_head.weight and model.embed_tokens.weight when tied.
        self._aliases = {name: names for names in storage.values() if len(names) > 1 for name in names}
        self._staged: dict[str, torch.Tensor] = {}
        self._staged_lock = threading.Lock()

    @property
    def group_names(self) -> list[str]:
        with self._groups_lock:
            return sorted(self._groups)

    # ----------------------------------------------------------------- groups
    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str = "weight_update_group", backend: str = "nccl") -> tuple[bool, str]:
        if backend not in BACKENDS:
            return False, f"backend must be one of {BACKENDS}, got {backend!r}"
        if backend == "nccl" and not torch.cuda.is_available():
            return False, "backend 'nccl' needs CUDA, which this embedded server does not have; use backend 'gloo'"
        with self._groups_lock:
            if group_name in self._groups:
                return False, f"weight update group {group_name!r} already exists; destroy it first"
        # One server = one rank (no tensor parallelism), so the rank is the offset itself.
        rank = rank_offset
        try:
            group = init_custom_process_group(
                backend=backend, init_method=f"tcp://{master_address}:{master_port}",
                world_size=world_size, rank=rank, group_name=group_name, timeout=self.group_timeout)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, like SGLang
            log.exception("init_weights_update_group failed")
            return False, f"Failed to initialize custom process group: {type(exc).__name__}: {exc}."
        with self._groups_lock:
            self._groups[group_name] = (group, backend)
        self.drop_staged("a new weight update group")
        log.info("weight update group %r ready: rank %d of %d via %s:%s (%s)",
                 group_name, rank, world_size, master_address, master_port, backend)
        return True, "Succeeded to initialize custom process group."

    def destroy_group(self, group_name: str = "weight_update_group") -> tuple[bool, str]:
        with self._groups_lock:
            entry = self._groups.pop(group_name, None)
        if entry is None:
            return False, f"The group to be destroyed ({group_name!r}) does not exist."
        self.drop_staged("the weight update group was destroyed")
        try:
            destroy_custom_process_group(entry[0])
        except Exception as exc:  # noqa: BLE001
            return False, f"Failed to destroy custom process group: {exc}."
        return True, "Succeeded to destroy custom process group."

    # ----------------------------------------------------------------- updates
    def update_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                group_name: str = "weight_update_group",
                                load_format: str | None = None, commit: bool = True) -> tuple[bool, str]:
        problem = self._check_request(names, dtypes, shapes, group_name, load_format)
        if isinstance(problem, str):
            self.drop_staged("a request was refused")
            return False, problem
        entry, torch_dtypes, shapes = problem
        group, backend = entry
        device = "cuda" if backend == "nccl" else "cpu"
        try:
            if load_format == "flattened_bucket":
                buffer = torch.empty(bucket_nbytes(torch_dtypes, shapes), dtype=torch.uint8, device=device)
                dist.broadcast(buffer, src=0, group=group)
                tensors = unflatten_tensors(buffer.cpu(), torch_dtypes, shapes)
            else:
                tensors = [torch.empty(shape, dtype=dtype, device=device) for dtype, shape in zip(torch_dtypes, shapes)]
                handles = [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
                for handle in handles:
                    handle.wait()
                tensors = [t.cpu() for t in tensors]
        except Exception as exc:  # noqa: BLE001 - the sender went away or aborted the group
            self.drop_staged("the broadcast failed")
            return False, f"Failed to update parameter online: the broadcast failed: {type(exc).__name__}: {exc}"
        return self.apply(list(zip(names, tensors)), commit=commit)

    def _check_request(self, names, dtypes, shapes, group_name, load_format):
        """(group entry, torch dtypes, int shapes), or the refusal message; nothing is received yet."""
        with self._groups_lock:
            entry = self._groups.get(group_name)
        if entry is None:
            return (f"Group {group_name!r} not in {self.group_names}. "
                    "Please call `init_weights_update_group` first.")
        if load_format not in LOAD_FORMATS_DISTRIBUTED:
            return f"load_format must be one of {LOAD_FORMATS_DISTRIBUTED}, got {load_format!r}"
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) \
                or not len(names) == len(dtypes) == len(shapes) or not names:
            return "names, dtypes and shapes must be non-empty lists of the same length"
        try:
            torch_dtypes = [parse_dtype(d) for d in dtypes]
            shapes = [[int(s) for s in shape] for shape in shapes]
            if any(s < 0 for shape in shapes for s in shape):
                raise ValueError(f"shapes must be non-negative, got {shapes}")
        except (TypeError, ValueError) as exc:
            return f"Failed to update parameter online: {exc}"
        return entry, torch_dtypes, shapes

    def update_from_tensor(self, entries: list, load_format: str | None = None,
                           commit: bool = True) -> tuple[bool, str]:
        """`/update_weights_from_tensor`: entry 0 is this server's (SGLang TP rank 0; it has one rank).

        Decoded with tensor_payload's restricted unpickler only; the tensors live in the sender's
        shared memory, so they are copied before the call answers.
        """
        from erc_megatron.rollout.tensor_payload import PayloadError, decode_named_tensors  # noqa: PLC0415

        if load_format not in LOAD_FORMATS_TENSOR:
            self.drop_staged("a request was refused")
            return False, f"load_format must be one of {LOAD_FORMATS_TENSOR}, got {load_format!r}"
        if not entries:
            self.drop_staged("a request was refused")
            return False, "serialized_named_tensors must hold one entry per TP rank, got none"
        try:
            named = decode_named_tensors(entries[0])
        except PayloadError as exc:
            self.drop_staged("a request was refused")
            return False, f"Failed to update weights from tensor: {exc}"
        if any(t.device.type != "cpu" for _, t in named):
            self.drop_staged("a request was refused")
            return False, "Failed to update weights from tensor: this server runs on CPU and takes CPU tensors only"
        return self.apply([(name, t.clone()) for name, t in named], commit=commit)

    def update_from_disk(self, model_path: str, load_format: str | None = None) -> tuple[bool, str]:
        if load_format not in LOAD_FORMATS_DISK:
            return False, f"load_format must be one of {LOAD_FORMATS_DISK}, got {load_format!r}"
        files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
        if not files:
            return False, f"Failed to update weights: no *.safetensors files in {model_path!r}"
        from safetensors.torch import load_file  # noqa: PLC0415 - only this endpoint needs it

        named = []
        try:
            for path in files:
                named.extend(load_file(path).items())
        except Exception as exc:  # noqa: BLE001
            return False, f"Failed to update weights: cannot read {model_path!r}: {exc}"
        return self.apply(named)

    def apply(self, named: list[tuple[str, torch.Tensor]], commit: bool = True) -> tuple[bool, str]:
        """Validate every (HF name, tensor); stage them, or with `commit` copy them and everything
        staged before into the model between two engine steps. A refusal drops the staged ones."""
        problems = self._validate(named)
        if problems:
            dropped = self.drop_staged("a bucket was refused")
            return False, ("Failed to update weights, nothing was changed" +
                           (f" (the {dropped} tensors staged by earlier calls were dropped)" if dropped else "") +
                           ": " + "; ".join(problems))
        with self._staged_lock:
            self._staged.update(named)
            if not commit:
                return True, (f"Succeeded to update parameter online ({len(named)} tensors staged "
                              "until the last bucket).")
        applied = self.commit_staged()
        return True, f"Succeeded to update parameter online ({applied} tensors applied)."

    def commit_staged(self) -> int:
        """Put every staged tensor into the model at once, between two engine steps; returns how many.

        A staged tensor of the weight's dtype, shape and device becomes the weight's storage (its
        received buffer is nobody else's), so an update costs no second copy of the model; others
        (a cast, e.g. bfloat16 on the wire into float32 weights) are copied in.
        """
        with self._staged_lock:
            staged, self._staged = self._staged, {}
        if staged:
            with self.engine.exclusive(), torch.no_grad():
                targets = self._targets
                if self._fused_experts:  # views of the storage the parameters hold now
                    from erc_megatron.patches.transformers_moe_experts import checkpoint_named_tensors

                    targets = checkpoint_named_tensors(self.engine.model)
                for name, tensor in staged.items():
                    target = targets[name]
                    # a fused-expert target is a view into the fused parameter: only a copy reaches it
                    if not self._fused_experts and tensor.dtype == target.dtype and tensor.shape == target.shape \
                            and tensor.device == target.device:
                        target.data = tensor
                    else:
                        target.data.copy_(tensor)
        return len(staged)

    def drop_staged(self, why: str) -> int:
        with self._staged_lock:
            count, self._staged = len(self._staged), {}
        if count:
            log.warning("dropped %d staged tensors: %s", count, why)
        return count

    @property
    def num_staged(self) -> int:
        with self._staged_lock:
            return len(self._staged)

    def _validate(self, named: list[tuple[str, torch.Tensor]]) -> list[str]:
        problems = []
        seen: dict[str, torch.Tensor] = {}
        unknown = [name for name, _ in named if name not in self._targets]
        if unknown:
            problems.append(f"unknown parameter name(s) {unknown} (not in the model's state dict)")
        for name, tensor in named:
            if name in seen:
                problems.append(f"parameter {name!r} appears twice")
            seen[name] = tensor
            target = self._targets.get(name)
            if target is None:
                continue
            if tuple(tensor.shape) != tuple(target.shape):
                problems.append(f"shape mismatch for {name!r}: got {list(tensor.shape)}, "
                                f"model has {list(target.shape)}")
            elif tensor.is_floating_point() != target.is_floating_point():
                problems.append(f"dtype mismatch for {name!r}: got {tensor.dtype}, model has {target.dtype}")
        for name, tensor in seen.items():
            for alias in self._aliases.get(name, ()):
                other = seen.get(alias)
                if alias != name and other is not None and other.shape == tensor.shape \
                        and not torch.equal(other.to(tensor.dtype), tensor) and name < alias:
                    problems.append(f"{name!r} and {alias!r} are tied in this model but got different values")
        return problems
