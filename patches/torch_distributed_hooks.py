"""Hooks on every torch.distributed collective / point-to-point function (module-global swapping).

torch has no public "observe every collective" callback (the c10d `_register_work`/flight
recorder machinery is private and NCCL-only), so while at least one listener is registered the
functions named in `COLLECTIVE_OPS` are replaced by wrappers in BOTH `torch.distributed` and
`torch.distributed.distributed_c10d`: megatron-core looks `torch.distributed.all_reduce` up at call
time, c10d's own helpers call each other through the c10d module globals. The same wrapper object
is installed under both names, so identity checks inside c10d (`p2p_op.op is isend`) still hold.
Removing the last listener puts the originals back (only where our wrapper is still installed, so
a patch someone added on top is not clobbered). With no listener nothing is installed at all.

Checked against torch 2.13.0 (installed and run here): for every op, the parameter names the
byte counting reads (`REQUIRED_PARAMS`), and `P2POp(op, tensor, peer, group, ...)`. Installing on a
torch where one of them changed raises `TorchInternalsChangedError` naming the function and the
installed version, instead of silently recording wrong bytes or groups.

Not seen (documented in the README): `ProcessGroup` methods called directly (`pg.allreduce(...)`),
functional collectives (`torch.distributed._functional_collectives`, DTensor, torch.compile'd
graphs), collectives issued from C++ (DDP's C++ reducer; megatron's DDP is Python), and a function
bound before the first install (`from torch.distributed import all_reduce`) unless it routes through
another c10d function, as the deprecated aliases do (megatron-core binds `all_gather_into_tensor` at
import; its calls show up as `all_gather_single`). A module imported while hooks are installed binds
our wrapper, which passes calls straight through once the last listener is gone.

One `CallRecord` per top-level call: collectives a hooked collective issues internally
(`all_gather_object` -> `all_gather`) are not separate records; for object collectives their bytes
are added to the outer record, since the payload size is only known after pickling.
"""
from __future__ import annotations

import dataclasses
import inspect
import threading
import time
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

CHECKED = "torch 2.13.0 (run)"

# parameters of each function that the byte counting and group lookup read ("group" for all but
# batch_isend_irecv, whose group comes from its P2POps)
REQUIRED_PARAMS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("tensor",), "all_reduce_coalesced": ("tensors",), "reduce": ("tensor",),
    "all_gather": ("tensor_list", "tensor"),
    "all_gather_single": ("output_tensor", "input_tensor"),
    "all_gather_into_tensor": ("output_tensor", "input_tensor"),
    "_all_gather_base": ("output_tensor", "input_tensor"),
    "all_gather_coalesced": ("output_tensor_lists", "input_tensor_list"),
    "all_gather_object": (),
    "reduce_scatter": ("output", "input_list"),
    "reduce_scatter_single": ("output", "input"), "reduce_scatter_tensor": ("output", "input"),
    "_reduce_scatter_base": ("output", "input"),
    "broadcast": ("tensor",), "broadcast_object_list": (),
    "all_to_all": ("output_tensor_list", "input_tensor_list"), "all_to_all_single": ("output", "input"),
    "gather": ("tensor", "gather_list"), "gather_object": (), "scatter": ("tensor", "scatter_list"),
    "scatter_object_list": (),
    "barrier": (), "monitored_barrier": (),
    "send": ("tensor",), "recv": ("tensor",), "isend": ("tensor",), "irecv": ("tensor",),
    "send_object_list": (), "recv_object_list": (),
    "batch_isend_irecv": ("p2p_op_list",),
}
# Every collective / point-to-point entry point of torch.distributed that is hooked. Names absent
# from the installed torch are skipped.
COLLECTIVE_OPS: tuple[str, ...] = tuple(REQUIRED_PARAMS)
_OBJECT_OPS = frozenset({"all_gather_object", "gather_object", "scatter_object_list", "broadcast_object_list",
                         "send_object_list", "recv_object_list"})
_ALWAYS_ASYNC = frozenset({"isend", "irecv", "batch_isend_irecv"})
_P2POP_PARAMS = ("op", "tensor", "peer", "group")
_MODULES = (dist, c10d)


class TorchInternalsChangedError(RuntimeError):
    """torch.distributed's functions no longer have the shape these hooks expect."""


@dataclasses.dataclass
class CallRecord:
    """One top-level torch.distributed call on this rank."""

    op: str
    """Name of the torch.distributed function called (e.g. "all_reduce", "_all_gather_base")."""
    group: Any
    """The ProcessGroup passed (None: the default group; for batches, the first P2POp's group)."""
    bytes_in: int
    """Bytes of this rank's input buffer(s)."""
    bytes_out: int
    """Bytes of this rank's output buffer(s)."""
    start: float
    """time.perf_counter() when the call was entered."""
    seconds: float
    """Wall time inside the call (the time to issue, for async calls)."""
    async_op: bool
    """Whether the call returned before completion (async_op=True, isend/irecv, batches)."""
    result: Any = None
    """What the call returned (a Work or a list of Works for async calls)."""


class Listener(Protocol):
    def before_call(self, op: str) -> Any:
        """Called on entry of a top-level call; the return value is handed to `after_call`."""

    def after_call(self, record: CallRecord, token: Any) -> None:
        """Called once the call returned (also when it raised: then `record.result` is None)."""

    def after_wait(self, work: Any, start: float, seconds: float) -> None:
        """Called after `Work.wait()` returned on any work (the listener picks the ones it issued)."""


def _tensor_bytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(t) for t in x)
    return 0


def _payload(op: str, a: dict[str, Any]) -> tuple[int, int]:
    """(bytes_in, bytes_out) of one call from its bound arguments."""
    b = _tensor_bytes
    if op in ("all_reduce", "broadcast", "reduce"):
        return b(a.get("tensor")), b(a.get("tensor"))
    if op == "all_reduce_coalesced":
        return b(a.get("tensors")), b(a.get("tensors"))
    if op in ("send", "isend"):
        return b(a.get("tensor")), 0
    if op in ("recv", "irecv"):
        return 0, b(a.get("tensor"))
    if op == "all_gather":
        return b(a.get("tensor")), b(a.get("tensor_list"))
    if op in ("all_gather_single", "all_gather_into_tensor", "_all_gather_base"):
        return b(a.get("input_tensor")), b(a.get("output_tensor"))
    if op == "all_gather_coalesced":
        return b(a.get("input_tensor_list")), b(a.get("output_tensor_lists"))
    if op == "reduce_scatter":
        return b(a.get("input_list")), b(a.get("output"))
    if op in ("reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single"):
        return b(a.get("input")), b(a.get("output"))
    if op == "all_to_all":
        return b(a.get("input_tensor_list")), b(a.get("output_tensor_list"))
    if op == "gather":
        return b(a.get("tensor")), b(a.get("gather_list"))
    if op == "scatter":
        return b(a.get("scatter_list")), b(a.get("tensor"))
    if op == "batch_isend_irecv":
        ops = a.get("p2p_op_list") or []
        sent = sum(b(p.tensor) for p in ops if _root(p.op) is _root(c10d.isend))
        return sent, sum(b(p.tensor) for p in ops) - sent
    return 0, 0  # barriers; object collectives are sized by their nested calls


def _call_group(op: str, a: dict[str, Any]) -> Any:
    if op == "batch_isend_irecv":
        ops = a.get("p2p_op_list") or []
        return ops[0].group if ops else None
    return a.get("group")


def _root(fn: Any) -> Any:
    while isinstance(fn, _Wrapper):
        fn = fn.__wrapped__
    return fn


class _Frame:
    """A hooked call in progress on this thread (collects bytes of nested object-op traffic)."""

    __slots__ = ("sized_by_nested", "nested_in", "nested_out")

    def __init__(self, sized_by_nested: bool) -> None:
        self.sized_by_nested = sized_by_nested
        self.nested_in = 0
        self.nested_out = 0


_state_lock = threading.RLock()
_listeners: list[Listener] = []
_installed: list[tuple[Any, str, Any, _Wrapper]] = []  # (module, name, original, wrapper)
_tls = threading.local()


def _stack() -> list[_Frame]:
    s = getattr(_tls, "stack", None)
    if s is None:
        s = _tls.stack = []
    return s


class _Wrapper:
    """Callable standing in for one torch.distributed function while a listener is registered."""

    def __init__(self, name: str, original: Any, signature: inspect.Signature) -> None:
        self._name = name
        self.__wrapped__ = original
        self.__name__ = getattr(original, "__name__", name)
        self.__qualname__ = getattr(original, "__qualname__", name)
        self.__doc__ = getattr(original, "__doc__", None)
        self.__module__ = getattr(original, "__module__", None)
        self._signature = signature
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._positional = tuple(p.name for p in signature.parameters.values() if p.kind in positional)

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        # Signature.bind costs more than many small collectives; this is the same mapping for
        # the calls that fit (no *args), which is every well-formed call to these functions
        if len(args) <= len(self._positional):
            bound = dict(zip(self._positional, args))
            bound.update(kwargs)
            return bound
        try:
            return dict(self._signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:
            return dict(kwargs)  # let the original raise its own error

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        listeners = _listeners
        if not listeners:
            return self.__wrapped__(*args, **kwargs)
        stack = _stack()
        if stack:  # issued by a hooked collective: part of that record, not a new one
            if stack[-1].sized_by_nested:
                nin, nout = _payload(self._name, self._bind(args, kwargs))
                stack[-1].nested_in += nin
                stack[-1].nested_out += nout
            stack.append(_Frame(False))  # deeper calls are already counted in this one
            try:
                return self.__wrapped__(*args, **kwargs)
            finally:
                stack.pop()
        bound = self._bind(args, kwargs)
        restore = _normalise_p2p_ops(bound) if self._name == "batch_isend_irecv" else []
        frame = _Frame(self._name in _OBJECT_OPS)
        listeners = list(listeners)
        tokens = [lst.before_call(self._name) for lst in listeners]
        stack.append(frame)
        result = None
        t0 = time.perf_counter()
        try:
            result = self.__wrapped__(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - t0
            stack.pop()
            for p2p, fn in restore:
                p2p.op = fn
            nin, nout = _payload(self._name, bound)
            record = CallRecord(
                op=self._name, group=_call_group(self._name, bound), bytes_in=nin + frame.nested_in,
                bytes_out=nout + frame.nested_out, start=t0, seconds=seconds,
                async_op=self._name in _ALWAYS_ASYNC or bool(bound.get("async_op", False)), result=result)
            for lst, token in zip(listeners, tokens):
                lst.after_call(record, token)
        return result


def _normalise_p2p_ops(bound: dict[str, Any]) -> list[tuple[Any, Any]]:
    """c10d's batch_isend_irecv tells sends from receives by `p2p_op.op is isend` (the c10d global).

    A P2POp built before the hooks were installed holds the original function, one built while
    they are installed holds our wrapper; point every op at whatever c10d currently has and
    restore after the call.
    """
    restore = []
    for p2p in bound.get("p2p_op_list") or []:
        for name in ("isend", "irecv"):
            current = getattr(c10d, name)
            if p2p.op is not current and _root(p2p.op) is _root(current):
                restore.append((p2p, p2p.op))
                p2p.op = current
    return restore


def check_shapes() -> dict[str, inspect.Signature]:
    """Signatures of the hooked functions, after checking they still take what we read."""
    where = f"torch {torch.__version__} (hooks checked against {CHECKED})"
    params = list(inspect.signature(dist.P2POp.__init__).parameters)[1:]
    if tuple(params[: len(_P2POP_PARAMS)]) != _P2POP_PARAMS:
        raise TorchInternalsChangedError(f"torch.distributed.P2POp takes {params} in {where}; "
                                         f"expected it to start with {list(_P2POP_PARAMS)}")
    out = {}
    for name, required in REQUIRED_PARAMS.items():
        fn = getattr(c10d, name, None) or getattr(dist, name, None)
        if fn is None:
            continue
        fn = _root(fn)
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError) as err:
            raise TorchInternalsChangedError(f"torch.distributed.{name} has no inspectable signature in {where}: "
                                             f"{err}") from err
        want = set(required) | ({"group"} if name != "batch_isend_irecv" else set())
        missing = sorted(want - set(sig.parameters))
        if missing:
            raise TorchInternalsChangedError(f"torch.distributed.{name} no longer takes {missing} in {where}; "
                                             f"its parameters are {list(sig.parameters)}")
        out[name] = sig
    return out


def _work_class() -> Any:
    work = getattr(c10d, "Work", None)
    if work is None or not callable(getattr(work, "wait", None)):
        raise TorchInternalsChangedError(f"torch.distributed.distributed_c10d.Work.wait is gone in torch "
                                         f"{torch.__version__} (hooks checked against {CHECKED})")
    return work


def _make_wait(original: Any) -> Any:
    # Work is a pybind11 class: its `wait` can be replaced on the class, and every Work the c10d
    # backends return (gloo and NCCL alike, torch 2.13) resolves `wait` through it.
    def wait(self, *args: Any, **kwargs: Any) -> Any:
        listeners = _listeners
        if not listeners:
            return original(self, *args, **kwargs)
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            seconds = time.perf_counter() - t0
            for lst in listeners:
                lst.after_wait(self, t0, seconds)

    wait.__wrapped__ = original
    return wait


def _install() -> None:
    signatures = check_shapes()
    work = _work_class()
    original_wait = work.__dict__.get("wait", work.wait)
    wait = _make_wait(original_wait)
    work.wait = wait
    _installed.append((work, "wait", original_wait, wait))
    wrappers: dict[int, _Wrapper] = {}
    for name, sig in signatures.items():
        for module in _MODULES:
            original = getattr(module, name, None)
            if original is None or isinstance(original, _Wrapper):
                continue
            # one wrapper per original function, shared by both module names (identity checks)
            wrapper = wrappers.setdefault(id(original), _Wrapper(name, original, sig))
            setattr(module, name, wrapper)
            _installed.append((module, name, original, wrapper))


def _uninstall() -> None:
    while _installed:
        module, name, original, wrapper = _installed.pop()
        if getattr(module, name, None) is wrapper:
            setattr(module, name, original)


def add_listener(listener: Listener) -> None:
    """Start delivering every top-level call (from any thread) to `listener`; installs the hooks."""
    global _listeners
    with _state_lock:
        if not _listeners:
            _install()
        _listeners = [*_listeners, listener]  # replaced, not mutated: wrappers read it without the lock


def remove_listener(listener: Listener) -> None:
    """Stop delivering to `listener`; removing the last one puts the original functions back."""
    global _listeners
    with _state_lock:
        _listeners = [x for x in _listeners if x is not listener]
        if not _listeners:
            _uninstall()


def installed() -> bool:
    """Whether any hook is installed right now."""
    return bool(_installed)
