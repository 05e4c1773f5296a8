"""Learner -> rollout servers weight sync over SGLang's own weight-update API.

Set-up (once, lazily, and again after a failed attempt): rank 0 asks every server to drop a group
of the same name left over from an earlier learner process (a restart or resume), picks a free
port, creates its end of a process group named `weight_update_group` exactly as SGLang's server
side does (erc_megatron.patches.custom_process_group) while POSTing /init_weights_update_group to
every server concurrently (both sides block in the rendezvous; a server that refuses fails the
attempt at once with its own message). World size = 1 + the GPUs of all servers; each server's
rank_offset = 1 + the GPUs of the servers before it.

Each sync (collective over every learner rank):
    rank 0: POST /pause_generation, /flush_cache
    all ranks: iter_hf_weights(destination="rank0") gathers TP shards per stage, converts to HF names
        and moves each later stage's buckets to rank 0
    rank 0, per bucket: POST /update_weights_from_distributed (names, dtypes, shapes,
        load_format="flattened_bucket") to every server from threads, broadcast ONE flat buffer
        from group rank 0, check every answer; `weight_version` goes with the last bucket only,
        so a server reports the new version only once it has every tensor
    rank 0: POST /continue_generation
    all ranks: one tiny broadcast of the outcome (with the error and the server URLs); a failed
        attempt (any server error) is redone as a whole, up to `max_attempts`, so an update is
        never left half-applied; then every rank raises the same RuntimeError.
"""
from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, wait

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _local_address(urls: list[str]) -> str:
    from urllib.parse import urlparse

    hosts = {urlparse(u).hostname for u in urls}
    if hosts <= {"127.0.0.1", "localhost", "::1"}:
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())


def _in_daemon_thread(fn, *args, **kwargs) -> Future:
    """fn(*args, **kwargs) in a daemon thread, which cannot delay interpreter exit if left blocked."""
    future: Future = Future()

    def run():
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            future.set_exception(exc)

    threading.Thread(target=run, name="weight-update-join", daemon=True).start()
    return future


class RolloutServers:
    """The servers rank 0 talks to; owns the embedded server process when it started one."""

    def __init__(self, client, process=None):
        self.client = client
        self.process = process

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.process is not None:
                self.process.terminate()


def start_rollout_servers(cfg, log_dir: str | None = None):
    """Connect to `rollout.server_urls`, or start the embedded server on model.path. Rank 0 only."""
    import os

    from erc_megatron.rollout.client import SGLangClient
    from erc_megatron.rollout.server import launch_server_process

    rc = cfg.rollout
    process = None
    urls = list(rc.server_urls)
    if not urls:
        log_path = os.path.join(log_dir, "rollout_server.log") if log_dir else None
        if log_path:
            os.makedirs(log_dir, exist_ok=True)
        # one thread: the learner ranks share the same cores
        process = launch_server_process(cfg.model.path, seed=rc.embedded_seed, startup_timeout=rc.startup_timeout_s,
                                        log_path=log_path, extra_args=["--num-threads", str(rc.embedded_threads)])
        urls = [process.url]
    client = SGLangClient(urls, timeout=rc.request_timeout_s, max_retries=rc.max_retries)
    try:
        client.wait_healthy(rc.startup_timeout_s)
    except Exception:
        if process is not None:
            process.terminate()
        raise
    return RolloutServers(client, process), client


class WeightSync:
    """Call `sync(version)` on every learner rank after each update."""

    def __init__(self, learner, model_cfg, client, bucket_bytes: int, group_name: str = "weight_update_group",
                 max_attempts: int = 3, dtype: torch.dtype | None = None, timeout_s: float = 300.0):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.learner, self.model_cfg, self.client = learner, model_cfg, client
        self.bucket_bytes, self.group_name, self.max_attempts, self.dtype = bucket_bytes, group_name, max_attempts, dtype
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.group = None
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.last_bytes = 0
        self.timeout_s = timeout_s

    # ------------------------------------------------------------------ set-up (rank 0)
    def _server_gpus(self) -> list[int]:
        info = self.client.get_server_info()
        return [int(info[u].get("tp_size", 1) or 1) * int(info[u].get("dp_size", 1) or 1) for u in self.client.urls]

    def _connect(self) -> None:
        from erc_megatron.patches.custom_process_group import init_custom_process_group
        from erc_megatron.rollout.client import SGLangError

        gpus = self._server_gpus()
        world = 1 + sum(gpus)
        addr, port = _local_address(self.client.urls), _free_port()
        # A server still holding this group (its learner died, or this one was restarted) refuses a
        # new one of the same name: clear it first; "does not exist" is the normal answer.
        for url in self.client.urls:
            try:
                self.client.destroy_weights_update_group(url, self.group_name)
            except SGLangError:
                pass
        futures = []
        offset = 1
        for url, n in zip(self.client.urls, gpus):
            futures.append(self.client.submit(self.client.init_weights_update_group, url, addr, port, offset, world,
                                              self.group_name, self.backend))
            offset += n
        # Join from a thread so that a server refusing to join fails this attempt at once with its own
        # message, instead of after timeout_s in the rendezvous (which that thread then waits out).
        joined = _in_daemon_thread(init_custom_process_group, self.backend, f"tcp://{addr}:{port}", world, 0,
                                   self.group_name, timeout=datetime.timedelta(seconds=self.timeout_s))
        wait([joined, *futures], return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
        self.group = joined.result()
        for f in futures:
            f.result()
        log.info("weight update group %s: %d servers, world %d via %s:%d", self.group_name, len(gpus), world, addr, port)

    # ------------------------------------------------------------------ one attempt
    def _attempt(self, version: int) -> tuple[bool, str]:
        from erc_megatron.rollout.flat_bucket import flatten_tensors
        from erc_megatron.weights.hf_stream import iter_hf_weights, plan_hf_buckets
        from megatron.core import parallel_state as ps

        ok, error, sent = True, "", 0
        total = sum(len(s) for s in plan_hf_buckets(self.model_cfg, ps.get_pipeline_model_parallel_world_size(),
                                                    self.bucket_bytes, self.dtype))
        if self.rank == 0:
            try:
                if self.group is None:
                    self._connect()
                self.client.pause_generation()
                self.client.flush_cache()
            except Exception as exc:  # noqa: BLE001 - reported and retried as a whole
                ok, error = False, f"{type(exc).__name__}: {exc}"
        index = 0
        for bucket in iter_hf_weights(self.learner.model, self.model_cfg, self.bucket_bytes, dtype=self.dtype,
                                      destination="rank0"):
            index += 1
            if self.rank != 0 or not ok:
                continue  # other ranks only take part in the gathers; after a failure rank 0 drains
            try:
                names = [n for n, _ in bucket]
                tensors = [t.detach() for _, t in bucket]
                flat = flatten_tensors(tensors)
                futures = [self.client.submit(
                    self.client.update_weights_from_distributed, url, names, [t.dtype for t in tensors],
                    [list(t.shape) for t in tensors], self.group_name,
                    str(version) if index == total else None, "flattened_bucket", index == total)
                    for url in self.client.urls]
                dist.broadcast(flat, src=0, group=self.group)
                for f in futures:
                    f.result()
                sent += flat.numel() * flat.element_size()
            except Exception as exc:  # noqa: BLE001
                ok, error = False, f"{type(exc).__name__}: {exc}"
        if self.rank == 0:
            try:
                self.client.continue_generation()
            except Exception as exc:  # noqa: BLE001
                ok, error = ok and False, error or f"{type(exc).__name__}: {exc}"
            self.last_bytes = sent
        return ok, error

    def sync(self, version: int) -> None:
        error, urls = "", []
        for attempt in range(1, self.max_attempts + 1):
            t0 = time.perf_counter()
            ok, error = self._attempt(version)
            # rank 0 alone talks to the servers: every rank learns the outcome, the cause and the servers
            outcome = [(ok, error, list(getattr(self.client, "urls", [])))]
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast_object_list(outcome, src=0)
            ok, error, urls = outcome[0]
            if ok:
                if self.rank == 0:
                    log.info("weight sync v%d: %.1f MB in %.2fs", version, self.last_bytes / 2**20,
                             time.perf_counter() - t0)
                return
            if self.rank == 0:
                log.warning("weight sync v%d attempt %d/%d failed: %s", version, attempt, self.max_attempts, error)
                print(f"[erc-megatron] weight sync v{version} attempt {attempt}/{self.max_attempts} failed: {error}",
                      flush=True)
                self._reset_group()
        raise RuntimeError(f"weight sync v{version} to rollout servers {urls} failed {self.max_attempts} times; "
                           f"last error: {error}. The servers may hold partial weights (their weight_version "
                           "was not bumped)")

    def _reset_group(self) -> None:
        """After a failure the group may be broken: tear it down on both sides, rebuild next attempt."""
        from erc_megatron.patches.custom_process_group import destroy_custom_process_group

        if self.group is None:
            return
        for url in self.client.urls:
            try:
                self.client.destroy_weights_update_group(url, self.group_name)
            except Exception as exc:  # noqa: BLE001 - a dead server cannot be told
                log.warning("destroy_weights_update_group on %s: %s", url, exc)
        try:
            destroy_custom_process_group(self.group)
        except Exception:  # noqa: BLE001
            pass
        self.group = None

    def close(self) -> None:
        if self.rank == 0 and self.group is not None:
            self._reset_group()
