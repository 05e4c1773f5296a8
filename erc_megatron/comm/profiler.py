"""Communication profiler: every collective and p2p op of chosen training steps, on every rank.

    profiler = CommProfiler(run_dir, steps={2, 3}, extra_roles={"weight_update_group": "weight-sync"})
    for step in ...:
        profiler.begin_step(step)           # installs the hooks if the step is chosen
        with comm_phase("old_policy"):
            ...
        profiler.end_step()                 # removes them; after the last chosen step: writes the report

For each call: op, process group by role, bytes, issue time, duration and the RL-step phase. The
calls are seen through `erc_megatron.patches.torch_distributed_hooks` (which also lists what is
not seen); nothing is installed outside chosen steps, and `comm_phase` is a shared no-op context
when no step is being profiled.

Roles come from megatron-core's `parallel_state` groups (TP, PP, DP, CP, EP, MP = tensor x pipeline
model-parallel, used by the optimizer's grad-norm and found-inf reductions, embedding = the tied
embedding / position-embedding groups between first and last stage), from names the trainer
registers (`extra_roles`: the weight-sync group), from a `comm_phase(..., role=...)` block (the
step statistics reduce on the world group but are their own role), and "world" for the default
group. Anything else is "other".

Timing (see `timing`): on CPU the wall time; an async op (async_op=True, isend/irecv, batches)
lasts from its issue to the end of the first `wait()` on its work (or the work's completion
callback when the backend has one), and the part of that not spent inside the issuing call or a
`wait()` is reported as hidden by overlap. On GPU (NCCL) CUDA events on the current stream time
each op on the device (`timing.CudaTimer`).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch.distributed as dist

from erc_megatron.comm.recorder import group_id
from erc_megatron.comm.timing import CudaTimer, WallTimer
from erc_megatron.patches import torch_distributed_hooks as hooks

PHASES = ("rollout", "rollout_broadcast", "old_policy", "forward_backward", "statistics", "optimizer",
          "weight_sync", "other")
"""RL-step phases, in step order; "other" is anything outside a `comm_phase` block."""
ROLES = ("TP", "PP", "DP", "CP", "EP", "MP", "embedding", "weight-sync", "statistics", "world", "other")
"""Process-group roles, in the order reports list them."""

# (role, parallel_state getter, kwargs): the first role found for a group wins
_MEGATRON_GROUPS = (
    ("TP", "get_tensor_model_parallel_group", {}),
    ("PP", "get_pipeline_model_parallel_group", {}),
    ("CP", "get_context_parallel_group", {}),
    ("DP", "get_data_parallel_group", {}),
    ("DP", "get_data_parallel_group", {"with_context_parallel": True}),
    ("DP", "get_intra_distributed_optimizer_instance_group", {}),
    ("EP", "get_expert_model_parallel_group", {}),
    ("EP", "get_expert_data_parallel_group", {}),
    ("EP", "get_expert_tensor_parallel_group", {}),
    # the alltoall dispatcher all-gathers its token counts over expert TP x EP (its own group object)
    ("EP", "get_expert_tensor_and_model_parallel_group", {}),
    ("MP", "get_model_parallel_group", {}),
    ("embedding", "get_embedding_group", {}),
    ("embedding", "get_position_embedding_group", {}),
)

_active: CommProfiler | None = None
_phases: list[tuple[str, str | None, float]] = []  # (phase, role override, start) of open blocks
_NULL = contextlib.nullcontext()


def megatron_group_roles() -> dict[str, str]:
    """{c10d group name: role} of megatron-core's initialised parallel_state groups on this rank."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return {}
    roles: dict[str, str] = {}
    for role, getter, kwargs in _MEGATRON_GROUPS:
        fn = getattr(ps, getter, None)
        if fn is None:
            continue
        try:
            try:
                group = fn(check_initialized=False, **kwargs)
            except TypeError:  # the data-parallel getters take no check_initialized
                group = fn(**kwargs)
        except Exception:  # noqa: BLE001 - not initialised in this layout (e.g. no experts)
            continue
        for g in group if isinstance(group, (list, tuple)) else [group]:
            name = getattr(g, "group_name", None)
            if name is not None:
                roles.setdefault(name, role)
    return roles


def comm_phase(name: str, role: str | None = None, **attrs: Any):
    """Tag the collectives of a block with an RL-step phase (and optionally a role for all of them).

    `attrs` (JSON-able: shapes, counts) are stored with the phase in the step record. A shared
    no-op context when no step is being profiled.
    """
    profiler = _active
    if profiler is None:
        return _NULL
    return profiler._phase(name, role, attrs)


class CommProfiler:
    """Records chosen steps on this rank; `end_step` of the last one writes the run's report."""

    def __init__(self, run_dir: str, steps: Iterable[int] | None = None, extra_roles: dict[str, str] | None = None,
                 use_cuda: bool | None = None, last_step: int | None = None, say=print) -> None:
        """`steps`: 1-based step numbers to record (None: every step; then the report is written at
        `last_step`, or by calling `finish()`)."""
        self.run_dir = run_dir
        self.steps = None if steps is None else set(steps)
        self.last_step = max(self.steps) if self.steps else last_step
        self.extra_roles = dict(extra_roles or {})
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if use_cuda is None:
            use_cuda = dist.is_initialized() and dist.get_backend() == "nccl"
        self.timer = CudaTimer() if use_cuda else WallTimer()
        self.say = say
        # one clock for every rank's trace: wall time at start, advanced by perf_counter
        self._epoch_wall, self._epoch_perf = time.time(), time.perf_counter()
        self._roles: dict[str, str] | None = None
        self._groups: dict[int, tuple[str, tuple[int, ...], str]] = {}  # id(pg) -> (label, ranks, role)
        self._events: list[dict] = []
        self._pending: list[dict] = []  # this step's events
        self._step_records: list[dict] = []
        self._step: int | None = None
        self._step_start = 0.0
        self._step_phases: dict[str, dict] = {}
        self.written: str | None = None

    # ------------------------------------------------------------------ step window
    def wants(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def begin_step(self, step: int) -> None:
        global _active
        if not self.wants(step) or self._step is not None:
            return
        if self._roles is None:
            self._roles = {**megatron_group_roles(), **self.extra_roles}
        self._step, self._step_start = step, time.perf_counter()
        self._step_phases, self._pending = {}, []
        _phases.clear()
        _active = self
        hooks.add_listener(self)

    def end_step(self) -> None:
        global _active
        if self._step is None:
            return
        hooks.remove_listener(self)
        _active = None
        seconds = time.perf_counter() - self._step_start
        self.timer.resolve(self._pending)
        self._events += self._pending
        self._step_records.append({"step": self._step, "start": self._clock(self._step_start), "seconds": seconds,
                                   "phases": self._step_phases})
        done, self._step, self._pending = self._step, None, []
        if self.last_step is not None and done >= self.last_step:
            self.finish()

    def finish(self) -> str | None:
        """Gather every rank's record on rank 0 and write the report (collective: call on every rank)."""
        if self.written is not None:
            return self.written
        from erc_megatron.comm.report import build_profile, write_outputs

        mine = {"rank": self.rank, "steps": self._step_records, "events": self._events}
        if self.world_size > 1:
            every: list = [None] * self.world_size
            dist.all_gather_object(every, mine)  # hooks are off: not part of the profile
        else:
            every = [mine]
        self.written = ""
        if self.rank == 0:
            profile = build_profile(every, timer=type(self.timer).__name__)
            paths, table = write_outputs(profile, self.run_dir)
            self.say(f"communication profile (steps {[r['step'] for r in self._step_records]}):\n{table}")
            self.say(f"communication profile written: {', '.join(paths)}")
            self.written = paths[0]
        return self.written

    # ------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def _phase(self, name: str, role: str | None, attrs: dict) -> Iterator[None]:
        start = time.perf_counter()
        _phases.append((name, role, start))
        try:
            yield
        finally:
            _phases.pop()
            end = time.perf_counter()
            rec = self._step_phases.setdefault(name, {"seconds": 0.0, "spans": [], "attrs": []})
            rec["seconds"] += end - start
            rec["spans"].append([self._clock(start), end - start])
            if attrs:
                rec["attrs"].append(attrs)

    # ------------------------------------------------------------------ hooks.Listener
    def before_call(self, op: str) -> Any:
        return self.timer.before()

    def after_call(self, record: hooks.CallRecord, token: Any) -> None:
        label, ranks, role = self._group(record.group)
        phase, override = ("other", None)
        if _phases:
            phase, override = _phases[-1][0], next((r for _, r, _ in reversed(_phases) if r), None)
        event = {"step": self._step, "phase": phase, "role": override or role, "op": record.op, "group": label,
                 "group_size": len(ranks), "bytes": max(record.bytes_in, record.bytes_out),
                 "bytes_in": record.bytes_in, "bytes_out": record.bytes_out, "start": self._clock(record.start),
                 "issue_s": record.seconds, "async": record.async_op}
        self.timer.after(event, record, token)
        self._pending.append(event)

    def after_wait(self, work: Any, start: float, seconds: float) -> None:
        self.timer.waited(work, start, seconds)

    # ------------------------------------------------------------------ helpers
    def _clock(self, perf: float) -> float:
        return self._epoch_wall + (perf - self._epoch_perf)

    def _group(self, group: Any) -> tuple[str, tuple[int, ...], str]:
        key = id(group)
        hit = self._groups.get(key)
        if hit is None:
            gid = group_id(group)
            name = gid.name if gid is not None else None
            world = dist.group.WORLD
            is_world = group is None or group is world
            role = "world" if is_world else (self._roles or {}).get(name, "other")
            hit = (gid.label if gid is not None else "?", gid.ranks if gid is not None else (), role)
            self._groups[key] = hit
        return hit


class NullProfiler:
    """What the trainer holds when profiling is off: no hooks, no files."""

    def begin_step(self, step: int) -> None:
        return None

    def end_step(self) -> None:
        return None

    def finish(self) -> None:
        return None


def start_comm_profiler(run_dir: str, profile_comm: bool, profile_steps: list[int], last_step: int,
                        extra_roles: dict[str, str] | None = None, say=print) -> CommProfiler | NullProfiler:
    """The trainer's profiler from `trainer.profile_comm` / `trainer.profile_steps` (empty: every step)."""
    if not profile_comm:
        return NullProfiler()
    return CommProfiler(run_dir, steps=profile_steps or None, extra_roles=extra_roles, last_step=last_step, say=say)


def load_profile(run_dir_or_file: str) -> dict:
    path = run_dir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "comm_profile.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no communication profile at {path}: run training with "
                                "trainer.profile_comm=true (and trainer.profile_steps=[...]) first")
    with open(path) as f:
        return json.load(f)
