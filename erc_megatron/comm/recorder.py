"""Record every torch.distributed collective issued while a `record_collectives()` block is open.

    with record_collectives() as rec:
        loss = model(batch)            # our code, megatron-core, anything calling torch.distributed
    rec.count("all_reduce", group=tp_group)
    print(rec.format_summary())

How: on entering the first (outermost) recorder, the collective functions named in
`COLLECTIVE_OPS` are replaced by recording wrappers in BOTH `torch.distributed` and
`torch.distributed.distributed_c10d` (megatron-core looks `torch.distributed.all_reduce` up at
call time, c10d's own helpers call each other through the c10d module globals). The same wrapper
object is installed under both names, so identity checks inside c10d (`op is isend`) still hold.
Leaving the last recorder puts the originals back (only where our wrapper is still installed, so a
patch someone added on top is not clobbered). Not seen: `ProcessGroup` methods called directly,
functional collectives (`torch.distributed._functional_collectives`, DTensor), and a function
bound before the block (`from torch.distributed import all_reduce` at import time) unless it
routes through another c10d function, as the deprecated aliases do (megatron-core binds
`all_gather_into_tensor` at import; its calls show up as `all_gather_single`). A module imported
inside the block binds our wrapper, which passes calls straight through once recording stops.

Semantics:
- Process-wide: while any recorder is open, collectives from any thread are recorded, and every
  open recorder (nested or not) receives every event.
- One event per top-level call: collectives that a recorded collective issues internally
  (`all_gather_object` -> `all_gather`, `all_gather_into_tensor` -> `all_gather_single`) are not
  separate events. For object collectives their bytes are added to the outer event, since the
  payload size is only known after pickling.
- Bytes (per rank): `bytes_in` is this rank's input buffer, `bytes_out` its output buffer
  (all_reduce: both the tensor; all_gather: input shard / gathered output; reduce_scatter: full
  input / output shard; send: in only; recv: out only). `nbytes = max(bytes_in, bytes_out)` is the
  collective's message size in the nccl-tests sense, which is what bandwidth formulas take.
- `seconds` is the wall time of the call; for `async_op=True` calls (and isend/irecv/batches)
  that is the time to issue, not to complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# Every collective / point-to-point entry point of torch.distributed that we record. Names absent
# from the installed torch are skipped.
COLLECTIVE_OPS: tuple[str, ...] = (
    "all_reduce", "all_reduce_coalesced", "reduce",
    "all_gather", "all_gather_single", "all_gather_into_tensor", "_all_gather_base",
    "all_gather_coalesced", "all_gather_object",
    "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base",
    "broadcast", "broadcast_object_list",
    "all_to_all", "all_to_all_single",
    "gather", "gather_object", "scatter", "scatter_object_list",
    "barrier", "monitored_barrier",
    "send", "recv", "isend", "irecv", "send_object_list", "recv_object_list", "batch_isend_irecv",
)
_OBJECT_OPS = frozenset({"all_gather_object", "gather_object", "scatter_object_list", "broadcast_object_list",
                         "send_object_list", "recv_object_list"})
_ALWAYS_ASYNC = frozenset({"isend", "irecv", "batch_isend_irecv"})
_MODULES = (dist, c10d)


@dataclasses.dataclass(frozen=True)
class GroupId:
    """Identity of a process group as seen from this rank."""

    name: str | None
    """c10d group name (`ProcessGroup.group_name`; "0" is usually the default group)."""
    ranks: tuple[int, ...]
    """Global ranks of the group, ordered by group rank."""

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def label(self) -> str:
        return f"pg{self.name}[{','.join(map(str, self.ranks))}]"


@dataclasses.dataclass(frozen=True)
class CollectiveEvent:
    """One recorded collective call on this rank."""

    op: str
    """Name of the torch.distributed function called (e.g. "all_reduce", "_all_gather_base")."""
    group: GroupId | None
    """Process group the call ran on (None if it could not be determined)."""
    bytes_in: int
    """Bytes of this rank's input buffer(s)."""
    bytes_out: int
    """Bytes of this rank's output buffer(s)."""
    seconds: float
    """Wall time of the call (issue time only when `async_op`)."""
    async_op: bool
    """Whether the call returned before completion (async_op=True, isend/irecv, batches)."""

    @property
    def nbytes(self) -> int:
        """Message size: the larger of this rank's input and output buffers."""
        return max(self.bytes_in, self.bytes_out)


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


def group_id(group: Any) -> GroupId | None:
    """GroupId of a ProcessGroup (None = the default group), or None if it cannot be resolved."""
    try:
        pg = dist.group.WORLD if group is None else group
        return GroupId(name=getattr(pg, "group_name", None), ranks=tuple(dist.get_process_group_ranks(pg)))
    except Exception:  # noqa: BLE001 - a non-member rank or a torn-down group: record without identity
        return None


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
    """A recorded call in progress on this thread (collects bytes of nested object-op traffic)."""

    __slots__ = ("sized_by_nested", "nested_in", "nested_out")

    def __init__(self, sized_by_nested: bool) -> None:
        self.sized_by_nested = sized_by_nested
        self.nested_in = 0
        self.nested_out = 0


_state_lock = threading.RLock()
_active: list[CollectiveRecorder] = []
_installed: list[tuple[Any, str, Any, _Wrapper]] = []  # (module, name, original, wrapper)
_tls = threading.local()


def _stack() -> list[_Frame]:
    s = getattr(_tls, "stack", None)
    if s is None:
        s = _tls.stack = []
    return s


class _Wrapper:
    """Callable standing in for one torch.distributed function while recording is on."""

    def __init__(self, name: str, original: Any) -> None:
        self._name = name
        self.__wrapped__ = original
        self.__name__ = getattr(original, "__name__", name)
        self.__qualname__ = getattr(original, "__qualname__", name)
        self.__doc__ = getattr(original, "__doc__", None)
        self.__module__ = getattr(original, "__module__", None)
        try:
            self._signature: inspect.Signature | None = inspect.signature(original)
        except (TypeError, ValueError):
            self._signature = None

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if self._signature is None:
            return dict(kwargs)
        try:
            return dict(self._signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:
            return dict(kwargs)  # let the original raise its own error

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        stack = _stack()
        if not _active:
            return self.__wrapped__(*args, **kwargs)
        if stack:  # issued by a collective being recorded: part of that event, not a new one
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
        stack.append(frame)
        t0 = time.perf_counter()
        try:
            result = self.__wrapped__(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - t0
            stack.pop()
            for p2p, fn in restore:
                p2p.op = fn
        nin, nout = _payload(self._name, bound)
        event = CollectiveEvent(
            op=self._name, group=group_id(_call_group(self._name, bound)),
            bytes_in=nin + frame.nested_in, bytes_out=nout + frame.nested_out, seconds=seconds,
            async_op=self._name in _ALWAYS_ASYNC or bool(bound.get("async_op", False)))
        with _state_lock:
            receivers = list(_active)
        for rec in receivers:
            rec._add(event)
        return result


def _normalise_p2p_ops(bound: dict[str, Any]) -> list[tuple[Any, Any]]:
    """c10d's batch_isend_irecv tells sends from receives by `p2p_op.op is isend` (the c10d global).

    A P2POp built before recording started holds the original function, one built inside holds our
    wrapper; point every op at whatever c10d currently has and restore after the call.
    """
    restore = []
    for p2p in bound.get("p2p_op_list") or []:
        for name in ("isend", "irecv"):
            current = getattr(c10d, name)
            if p2p.op is not current and _root(p2p.op) is _root(current):
                restore.append((p2p, p2p.op))
                p2p.op = current
    return restore


def _install() -> None:
    wrappers: dict[int, _Wrapper] = {}
    for name in COLLECTIVE_OPS:
        for module in _MODULES:
            original = getattr(module, name, None)
            if original is None or isinstance(original, _Wrapper):
                continue
            # one wrapper per original function, shared by both module names (identity checks)
            wrapper = wrappers.setdefault(id(original), _Wrapper(name, original))
            setattr(module, name, wrapper)
            _installed.append((module, name, original, wrapper))


def _uninstall() -> None:
    while _installed:
        module, name, original, wrapper = _installed.pop()
        if getattr(module, name, None) is wrapper:
            setattr(module, name, original)


class CollectiveRecorder:
    """Events recorded while its `record_collectives()` block was open, with summaries."""

    def __init__(self) -> None:
        self.events: list[CollectiveEvent] = []
        self._lock = threading.Lock()

    def _add(self, event: CollectiveEvent) -> None:
        with self._lock:
            self.events.append(event)

    def clear(self) -> None:
        with self._lock:
            self.events.clear()

    def select(self, op: str | None = None, group: Any = None) -> list[CollectiveEvent]:
        """Events matching `op` (a function name) and `group` (a ProcessGroup, GroupId or group name)."""
        want = _group_filter(group)
        with self._lock:
            events = list(self.events)
        return [e for e in events if (op is None or e.op == op) and want(e.group)]

    def count(self, op: str | None = None, group: Any = None) -> int:
        return len(self.select(op, group))

    def total_bytes(self, op: str | None = None, group: Any = None) -> int:
        return sum(e.nbytes for e in self.select(op, group))

    def total_seconds(self, op: str | None = None, group: Any = None) -> float:
        return sum(e.seconds for e in self.select(op, group))

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """{"by_op": {op: stats}, "by_group": {group label: stats}, "total": {"all": stats}},
        stats = {"count", "bytes", "seconds"}."""
        out: dict[str, dict[str, dict[str, float]]] = {"by_op": {}, "by_group": {}, "total": {}}
        for e in self.select():
            label = e.group.label if e.group is not None else "?"
            for table, key in (("by_op", e.op), ("by_group", label), ("total", "all")):
                s = out[table].setdefault(key, {"count": 0, "bytes": 0, "seconds": 0.0})
                s["count"] += 1
                s["bytes"] += e.nbytes
                s["seconds"] += e.seconds
        return out

    def format_summary(self) -> str:
        s = self.summary()
        rows = [("", "count", "bytes", "seconds")]
        for table, title in (("by_op", "op"), ("by_group", "group")):
            rows.append((f"[{title}]", "", "", ""))
            for key, v in sorted(s[table].items()):
                rows.append((key, str(v["count"]), str(v["bytes"]), f"{v['seconds']:.6f}"))
        t = s["total"].get("all", {"count": 0, "bytes": 0, "seconds": 0.0})
        rows.append(("total", str(t["count"]), str(t["bytes"]), f"{t['seconds']:.6f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join(r[0].ljust(widths[0]) + "  " + "  ".join(c.rjust(w) for c, w in zip(r[1:], widths[1:]))
                         for r in rows)


def _group_filter(group: Any):
    if group is None:
        return lambda g: True
    if isinstance(group, GroupId):
        return lambda g: g == group
    if isinstance(group, str):
        return lambda g: g is not None and g.name == group
    target = group_id(group)
    if target is None:
        raise ValueError(f"group={group!r}: expected a ProcessGroup this rank belongs to, a GroupId or a group name")
    return lambda g: g == target


@contextlib.contextmanager
def record_collectives() -> Iterator[CollectiveRecorder]:
    """Open a recorder; see the module docstring. Nests; safe to open from several threads."""
    recorder = CollectiveRecorder()
    with _state_lock:
        if not _active:
            _install()
        _active.append(recorder)
    try:
        yield recorder
    finally:
        with _state_lock:
            _active.remove(recorder)
            if not _active:
                _uninstall()
