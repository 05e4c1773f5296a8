"""Run a function on N real gloo ranks (torch.multiprocessing, one process per rank).

Usage in a test:
    results = run_distributed(_worker, world_size=4, args=(seed,))
where `_worker(rank, world_size, *args)` is a module-level function; the default process group
is already initialised (gloo) when it runs, and its return values (picklable) come back as a list
indexed by rank. An exception on any rank fails the call with that rank's traceback.

Every launch costs a few seconds of imports: group several checks into one worker.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                init_method=f"tcp://127.0.0.1:{port}")
        out = fn(rank, world_size, *args)
        # plain pickle: torch's multiprocessing pickler would share tensors through a socket of this
        # process, which may be gone (it exits at once) before the parent reads them
        queue.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            import sys

            if "megatron.core.parallel_state" in sys.modules:  # importing megatron costs seconds
                try:
                    sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
                except Exception:  # noqa: BLE001
                    pass
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 600.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if not queue.empty():
            rank, ok, out = queue.get()
            if ok:
                results[rank] = pickle.loads(out)
            else:
                errors.append(f"--- rank {rank} ---\n{out}")
                break  # other ranks may now hang in a collective
        elif all(not p.is_alive() for p in procs) and queue.empty():
            break
        else:
            time.sleep(0.02)
    for p in procs:
        p.join(timeout=5 if not errors else 0.5)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
    if len(results) != world_size:
        raise AssertionError(f"only ranks {sorted(results)} of {world_size} reported (timeout or crash)")
    return [results[r] for r in range(world_size)]
