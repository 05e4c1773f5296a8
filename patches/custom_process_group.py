"""The weight-update process group, built exactly as SGLang's server builds its end.

SGLang (`sglang.srt.utils.init_custom_process_group`, used by `/init_weights_update_group`)
creates the group that carries learner -> rollout weight broadcasts like this:

    store, rank, world_size = next(rendezvous("tcp://MASTER:PORT", rank, world_size, timeout=...))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                      group_name=group_name, <options>=None, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}

Both ends must agree on every step (the same TCP store hosted by group rank 0, the same
`PrefixStore` prefix, the same group name) or the rendezvous never meets, so the learner side
(group rank 0) and our embedded server (ranks 1..) both call `init_custom_process_group` below.
The group is NOT the default group: passing `global_ranks_in_group=[]` makes torch skip the
membership check against the default group, so it works with or without one.

`_new_process_group_helper` is private to torch. Its shape was checked against:
  - torch 2.13.0 (installed and run here): `(group_size, group_rank, global_ranks_in_group,
    backend, store, group_name, backend_options=None, timeout=None, pg_tag=None,
    device_id=None, group_desc=None)`;
  - torch 2.6 - 2.9 (source): same parameters (`pg_options` was renamed `backend_options` in
    2.6.0, pytorch commit a0c7029a);
  - torch 2.4 - 2.5 (source): `pg_options` instead of `backend_options`, otherwise the same.
Any other shape fails with a message naming the installed torch version.

Collectives on the group: the rank mapping is the identity (as in SGLang), so
`dist.broadcast(t, src=0, group=pg)` addresses group rank 0 whatever the caller's rank in its
own default group.
"""
from __future__ import annotations

import os

import inspect
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

CHECKED = "torch 2.13.0 (run), 2.4-2.9 (source)"

# Positional parameters we pass, in order; a change here means torch reworked the helper.
_POSITIONAL = ("group_size", "group_rank", "global_ranks_in_group", "backend", "store", "group_name")
_OPTIONS_NAMES = ("backend_options", "pg_options")  # 2.6+ / <=2.5


class TorchInternalsChangedError(RuntimeError):
    """torch's private process-group helpers no longer have the shape this module expects."""


def _helper_options_name() -> str:
    """Return which options keyword `_new_process_group_helper` takes, checking its shape."""
    helper = getattr(c10d, "_new_process_group_helper", None)
    where = "torch.distributed.distributed_c10d._new_process_group_helper"
    if helper is None:
        raise TorchInternalsChangedError(
            f"{where} no longer exists in torch {torch.__version__}; init_custom_process_group "
            f"was checked against {CHECKED}")
    params = list(inspect.signature(helper).parameters)
    if tuple(params[: len(_POSITIONAL)]) != _POSITIONAL or "timeout" not in params:
        raise TorchInternalsChangedError(
            f"{where} changed shape in torch {torch.__version__}: parameters {params}, expected to "
            f"start with {list(_POSITIONAL)} and take 'timeout' (checked against {CHECKED})")
    for name in _OPTIONS_NAMES:
        if name in params:
            return name
    raise TorchInternalsChangedError(
        f"{where} in torch {torch.__version__} takes neither of {list(_OPTIONS_NAMES)} "
        f"(parameters {params}; checked against {CHECKED})")


def init_custom_process_group(
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    group_name: str,
    timeout: timedelta | None = None,
) -> dist.ProcessGroup:
    """Join (or host, as rank 0) a process group outside the default group, like SGLang does.

    `init_method` is "tcp://HOST:PORT"; rank 0 hosts the TCP store there. Blocks until all
    `world_size` ranks have joined (or `timeout`, default torch's 30 min, passes).
    """
    if not init_method.startswith("tcp://"):
        raise ValueError(f"init_method must be 'tcp://HOST:PORT', got {init_method!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if not group_name:
        raise ValueError("group_name must be a non-empty string")
    if group_name in c10d._world.pg_names.values():
        raise ValueError(f"a process group named {group_name!r} already exists in this process")
    options_name = _helper_options_name()
    timeout = c10d.default_pg_timeout if timeout is None else timeout

    # Under torchrun, TORCHELASTIC_USE_AGENT_STORE=True makes every tcp:// rendezvous a client of
    # the elastic agent's store; this group's store must be hosted by its own rank 0 instead.
    agent_store = os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    try:
        store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    finally:
        if agent_store is not None:
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = agent_store
    store.set_timeout(timeout)
    # Same prefix as SGLang's server side: keys must line up across the two processes.
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), store,
        group_name=group_name, timeout=timeout, **{options_name: None},
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def abort_custom_process_group(group: dist.ProcessGroup) -> None:
    """Abandon every collective still pending on `group` (it is unusable afterwards).

    A peer that refused a weight update before receiving its broadcast leaves the sender's
    broadcast pending until the group timeout; `ProcessGroup.abort()` (torch 2.13.0, run
    here) drops it at once, so the caller can report
    the peer's error instead of waiting. Destroy it afterwards as usual.
    """
    abort = getattr(group, "abort", None)
    if abort is None:
        raise TorchInternalsChangedError(
            f"torch {torch.__version__}: ProcessGroup has no abort(); abort_custom_process_group was checked "
            f"against {CHECKED}")
    abort()


def destroy_custom_process_group(group: dist.ProcessGroup) -> None:
    """Tear down a group made by `init_custom_process_group`; the default group is untouched."""
    if group is None or group is c10d.GroupMember.WORLD:
        raise ValueError("destroy_custom_process_group got the default group (or None); "
                         "use torch.distributed.destroy_process_group() for that")
    dist.destroy_process_group(group)
