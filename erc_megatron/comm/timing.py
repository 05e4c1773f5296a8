"""How long a profiled collective took: wall clock on CPU, CUDA events on GPU.

Both timers fill, per event, `dur_s` (the op's duration) and `hidden_s` (the part of an async op's
duration the rank spent doing something else, i.e. hidden by overlap; None where not measurable).

CPU (`WallTimer`): a blocking call lasts as long as the call. An async call (async_op=True,
isend/irecv, batch_isend_irecv) lasts from its issue to its completion, taken from the work's
completion callback where the backend has one (gloo collectives), else from the end of the first
`wait()` on it (gloo p2p works have no future; the wait returns when the transfer is done). Its
exposed time is the issue call plus the time blocked in `wait()`; the rest is hidden. An async op
never waited on in its step keeps its issue time and `hidden_s` None.

GPU (`CudaTimer`): NCCL calls return once the kernel is queued, so wall time says little. A CUDA
event is recorded on the current stream before the call and another after it (a blocking NCCL call
makes the current stream wait for the NCCL stream before returning) or, for an async call, after
the `wait()` on its work (which does the same); `dur_s` is the time between the two on the device.
`hidden_s` is None on GPU. Events are read once per step after one `torch.cuda.synchronize()`.
This path cannot run on the CPU-only test machine; it is kept to these few lines.
"""
from __future__ import annotations

import time
from typing import Any

import torch


def _works(result: Any) -> list:
    if result is None:
        return []
    return [w for w in result if w is not None] if isinstance(result, (list, tuple)) else [result]


class _WorkTracker:
    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Any, dict]] = {}

    def track(self, event: dict, record) -> list:
        works = _works(record.result) if record.async_op else []
        for w in works:
            self._by_id[id(w)] = (w, event)
        event["_works"] = works  # keeps them alive (ids stay unique) until the step is resolved
        return works

    def lookup(self, work: Any) -> dict | None:
        hit = self._by_id.get(id(work))
        return hit[1] if hit is not None and hit[0] is work else None

    def reset(self) -> None:
        self._by_id.clear()


class WallTimer(_WorkTracker):
    def before(self) -> None:
        return None

    def after(self, event: dict, record, token: None) -> None:
        event["_t0"], event["wait_s"] = record.start, 0.0
        for w in self.track(event, record):
            try:
                fut = w.get_future()
            except RuntimeError:  # e.g. gloo send/recv: "Work::getFuture not implemented"
                continue
            fut.add_done_callback(lambda _f, e=event: e.__setitem__("_done", max(e.get("_done", 0.0),
                                                                                 time.perf_counter())))

    def waited(self, work: Any, start: float, seconds: float) -> None:
        event = self.lookup(work)
        if event is not None:
            event["wait_s"] += seconds
            event["_wait_end"] = max(event.get("_wait_end", 0.0), start + seconds)

    def resolve(self, events: list[dict]) -> None:
        for e in events:
            t0, issue = e.pop("_t0"), e["issue_s"]
            end = e.pop("_done", None) or e.pop("_wait_end", None)
            e.pop("_done", None), e.pop("_wait_end", None), e.pop("_works", None)
            if not e["async"]:
                e["dur_s"], e["hidden_s"] = issue, 0.0
            elif end is None:
                e["dur_s"], e["hidden_s"] = issue, None
            else:
                dur = max(end - t0, issue)
                e["dur_s"], e["hidden_s"] = dur, max(0.0, dur - min(dur, issue + e["wait_s"]))
        self.reset()


class CudaTimer(_WorkTracker):
    def before(self) -> Any:
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def after(self, event: dict, record, token: Any) -> None:
        event["_cuda"] = [token, None]
        if not self.track(event, record):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            event["_cuda"][1] = end

    def waited(self, work: Any, start: float, seconds: float) -> None:
        event = self.lookup(work)
        if event is not None and event["_cuda"][1] is None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            event["_cuda"][1] = end

    def resolve(self, events: list[dict]) -> None:
        torch.cuda.synchronize()
        for e in events:
            start, end = e.pop("_cuda")
            e.pop("_works", None)
            e["dur_s"] = start.elapsed_time(end) / 1e3 if end is not None else e["issue_s"]
            e["hidden_s"] = None
        self.reset()
