"""Record every torch.distributed collective issued while a `record_collectives()` block is open.

    with record_collectives() as rec:
        loss = model(batch)            # our code, megatron-core, anything calling torch.distributed
    rec.count("all_reduce", group=tp_group)
    print(rec.format_summary())

How calls are seen, and what is not seen, is `erc_megatron.patches.torch_distributed_hooks`: the
hooks are installed when the first (outermost) recorder opens and removed when the last closes.

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
import threading
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from erc_megatron.patches import torch_distributed_hooks as hooks
from erc_megatron.patches.torch_distributed_hooks import COLLECTIVE_OPS

__all__ = ["COLLECTIVE_OPS", "CollectiveEvent", "CollectiveRecorder", "GroupId", "group_id", "record_collectives"]


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


def group_id(group: Any) -> GroupId | None:
    """GroupId of a ProcessGroup (None = the default group), or None if it cannot be resolved."""
    try:
        pg = dist.group.WORLD if group is None else group
        return GroupId(name=getattr(pg, "group_name", None), ranks=tuple(dist.get_process_group_ranks(pg)))
    except Exception:  # noqa: BLE001 - a non-member rank or a torn-down group: record without identity
        return None


class CollectiveRecorder:
    """Events recorded while its `record_collectives()` block was open, with summaries."""

    def __init__(self) -> None:
        self.events: list[CollectiveEvent] = []
        self._lock = threading.Lock()

    # hooks.Listener
    def before_call(self, op: str) -> None:
        return None

    def after_call(self, record: hooks.CallRecord, token: None) -> None:
        event = CollectiveEvent(op=record.op, group=group_id(record.group), bytes_in=record.bytes_in,
                                bytes_out=record.bytes_out, seconds=record.seconds, async_op=record.async_op)
        with self._lock:
            self.events.append(event)

    def after_wait(self, work: Any, start: float, seconds: float) -> None:
        return None

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
    hooks.add_listener(recorder)
    try:
        yield recorder
    finally:
        hooks.remove_listener(recorder)
