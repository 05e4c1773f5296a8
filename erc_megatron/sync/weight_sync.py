"""Learner -> rollout servers weight sync over SGLang's own weight-update API.

One sender per pipeline stage: tensor-parallel rank 0 of data-parallel replica 0 of each stage
sends that stage's weights over a weight-update group of its own (`group_name` for stage 0,
`group_name`_pp{s} for stage s; SGLang keeps groups by name, as slime uses them), so no weight
crosses the pipeline before it is sent, and the stages send at the same time.

Set-up (once per sender, lazily, and again after a failed attempt): the sender asks every server
to drop a group of that name left over from an earlier learner process (a restart or resume),
picks a free port, creates its end of the group exactly as SGLang's server side does
(erc_megatron.patches.custom_process_group) while POSTing /init_weights_update_group to every
server concurrently (both sides block in the rendezvous; a server that refuses fails the attempt
at once with its own message). World size = 1 + the GPUs of all servers; each server's
rank_offset = 1 + the GPUs of the servers before it.

Each sync (collective over every learner rank):
    rank 0: POST /pause_generation, /flush_cache; one small broadcast gives every sender the
        servers in rotation and rank 0's client settings (a non-zero sender builds its own client)
    all ranks: iter_hf_weights(destination="stage"): TP shards gathered per stage, HF names
    each stage's sender, per bucket (the next bucket gathered in a background thread meanwhile):
        POST /update_weights_from_distributed (names, dtypes, shapes, load_format="flattened_bucket",
        flush_cache=false, no weight_version) to every server from threads, broadcast ONE flat
        buffer over its stage's group, check every answer
    all ranks: every sender's outcome to every rank (one all_gather_object)
    rank 0, the commit, only once every stage's buckets arrived: POST /flush_cache (the embedded
        server applies everything it staged, between two engine steps), /update_weight_version,
        /continue_generation. After a failure instead: every stage's group is torn down on the
        servers (the embedded server drops what it staged: all old weights) before generation
        continues, and the attempt is redone as a whole up to `max_attempts`; generation stays
        paused between attempts.
    all ranks: one tiny broadcast of the outcome (with the error and the server URLs); after the
        last failed attempt every rank raises the same RuntimeError.

The weights an SGLang server serves are all old or all new: it applies each bucket when it
arrives, but generation is paused from before the first bucket until after the last one, and
`weight_version` changes only after every stage's buckets arrived. A sync that fails for good
leaves an SGLang server with some buckets applied and the old version (said in the error); the
embedded server keeps all old weights.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import socket
import threading
import time
import queue
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, wait

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


def _is_rejection(exc: BaseException) -> bool:
    """A server's 4xx answer (bad names, dtypes, shapes): the same request would fail again."""
    from erc_megatron.rollout.client import SGLangError

    return isinstance(exc, SGLangError) and exc.status is not None and 400 <= exc.status < 500


class _Prefetch:
    """Iterates `buckets` in a background thread, one bucket ahead of the consumer.

    Yields (names, dtypes, shapes, flat uint8 buffer, CUDA event or None). On CUDA the producer
    works on its own stream and records an event per bucket; the consumer makes its stream wait
    on that event before the broadcast reads the buffer.
    """

    _END = object()

    def __init__(self, buckets, cuda: bool = False, ahead: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._error: BaseException | None = None
        self.waited_s = 0.0
        self._thread = threading.Thread(target=self._produce, args=(buckets, cuda), name="weight-sync-gather",
                                        daemon=True)
        self._thread.start()

    def _produce(self, buckets, cuda: bool) -> None:
        from erc_megatron.rollout.flat_bucket import flatten_tensors

        stream = torch.cuda.Stream() if cuda else None
        try:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                for bucket in buckets:  # always to the end: the other ranks wait in these gathers
                    if self._error is not None:
                        continue
                    try:
                        tensors = [t.detach() for _, t in bucket]
                        flat = flatten_tensors(tensors)
                        ready = None
                        if cuda:
                            ready = torch.cuda.Event()
                            ready.record(stream)
                        item = ([n for n, _ in bucket], [t.dtype for t in tensors], [list(t.shape) for t in tensors],
                                flat, ready)
                    except Exception as exc:  # noqa: BLE001 - re-raised by join()
                        self._error = exc
                        continue
                    self._queue.put(item)
        except BaseException as exc:  # noqa: BLE001 - a failed gather; re-raised by join()
            self._error = self._error or exc
        finally:
            self._queue.put(self._END)

    def __iter__(self):
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            self.waited_s += time.perf_counter() - t0
            if item is self._END:
                return
            yield item

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


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
    from erc_megatron.rollout_server.server import launch_server_process

    rc = cfg.rollout
    process = None
    urls = list(rc.server_urls)
    if not urls:
        log_path = os.path.join(log_dir, "rollout_server.log") if log_dir else None
        if log_path:
            os.makedirs(log_dir, exist_ok=True)
        # one thread: the learner ranks share the same cores
        env = None
        if rc.api_key:
            from erc_megatron.rollout_server.server import API_KEY_ENV

            env = {**os.environ, API_KEY_ENV: rc.api_key}
        process = launch_server_process(cfg.model.path, seed=rc.embedded_seed, startup_timeout=rc.startup_timeout_s,
                                        log_path=log_path, extra_args=["--num-threads", str(rc.embedded_threads)],
                                        env=env)
        urls = [process.url]
    client = SGLangClient(urls, timeout=rc.request_timeout_s, max_retries=rc.max_retries, api_key=rc.api_key)
    try:
        client.wait_healthy(rc.startup_timeout_s)
    except Exception:
        if process is not None:
            process.terminate()
        raise
    return RolloutServers(client, process), client


SYNC_MODES = ("distributed", "tensor")
SENDERS = {"distributed": "stage", "tensor": "rank0"}
"""Who sends in each mode (hf_stream's `destination`): one sender per pipeline stage, or rank 0 alone
(colocated: rank 0 posts every bucket). The planner models the same senders."""


class WeightSync:
    """Call `sync(version)` on every learner rank after each update.

    mode "distributed": the per-stage broadcasts described above. mode "tensor" (colocated: the
    servers run on rank 0's machine): no group; every stage's buckets go to rank 0, each is copied
    into one reused shared-memory buffer and POSTed to /update_weights_from_tensor as SGLang's
    serialized named tensors (one entry per server TP rank), flush_cache=false but for the last, so
    the embedded server applies all at once.

    `client` is rank 0's (None elsewhere); the other stages' senders build equal clients from its
    settings.
    """

    def __init__(self, learner, model_cfg, client, bucket_bytes: int, group_name: str = "weight_update_group",
                 max_attempts: int = 3, dtype: torch.dtype | None = None, timeout_s: float = 300.0,
                 mode: str = "distributed"):
        if mode not in SYNC_MODES:
            raise ValueError(f"weight sync mode must be one of {SYNC_MODES}, got {mode!r}")
        self.mode = mode
        self._shared: torch.Tensor | None = None  # tensor mode: the shared-memory bucket buffer
        self._buffers = None  # CPU: the stream's TransferBuffers, kept for the run
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.learner, self.model_cfg, self.client = learner, model_cfg, client
        self.bucket_bytes, self.group_name = bucket_bytes, group_name
        self.max_attempts, self.dtype = max_attempts, dtype
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.group = None  # this rank's weight-update group (a stage sender's), or None
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.last_bytes = 0
        """Bytes every sender together sent in the last sync."""
        self._urls: list[str] = []  # the servers in this rank's current weight-update group
        self._http = client  # the client this rank sends with (rank 0's, or a stage sender's own)
        self._group_name: str | None = None  # the name of self.group
        self.last_gather_wait_s = 0.0
        """Seconds the slowest sender waited for its next bucket's gather in the last sync (not hidden by overlap)."""
        self.timeout_s = timeout_s

    @property
    def group_names(self) -> list[str]:
        """One weight-update group per pipeline stage: stage 0's is `group_name`, stage s's `group_name`_pp{s}."""
        from megatron.core import parallel_state as ps

        return [self._stage_group_name(s) for s in range(ps.get_pipeline_model_parallel_world_size())]

    def _stage_group_name(self, stage: int) -> str:
        return self.group_name if stage == 0 else f"{self.group_name}_pp{stage}"

    # ------------------------------------------------------------------ set-up (each stage's sender)
    def _server_gpus(self) -> list[int]:
        info = self._http.get_server_info()
        return [int(info[u].get("tp_size", 1) or 1) * int(info[u].get("dp_size", 1) or 1) for u in self._urls]

    def _connect(self, urls: list[str], group_name: str) -> None:
        from erc_megatron.patches.custom_process_group import init_custom_process_group
        from erc_megatron.rollout.client import SGLangError

        self._urls = list(urls)
        gpus = self._server_gpus()
        world = 1 + sum(gpus)
        addr, port = _local_address(self._urls), _free_port()
        # A server still holding this group (its learner died, or this one was restarted) refuses a
        # new one of the same name: clear it first; "does not exist" is the normal answer.
        for url in self._urls:
            try:
                self._http.destroy_weights_update_group(url, group_name)
            except SGLangError:
                pass
        futures = []
        offset = 1
        for url, n in zip(self._urls, gpus):
            futures.append(self._http.submit(self._http.init_weights_update_group, url, addr, port, offset, world,
                                             group_name, self.backend))
            offset += n
        # Join from a thread so that a server refusing to join fails this attempt at once with its own
        # message, instead of after timeout_s in the rendezvous (which that thread then waits out).
        joined = _in_daemon_thread(init_custom_process_group, self.backend, f"tcp://{addr}:{port}", world, 0,
                                   group_name, timeout=datetime.timedelta(seconds=self.timeout_s))
        wait([joined, *futures], return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
        self.group = joined.result()
        self._group_name = group_name
        for f in futures:
            f.result()
        log.info("weight update group %s: %d servers, world %d via %s:%d",
                 group_name, len(gpus), world, addr, port)

    def _sender_client(self, settings: dict):
        """Rank 0 sends with its own client; another stage's sender with one built from rank 0's settings."""
        from erc_megatron.rollout.client import SGLangClient

        if self.rank == 0:
            return self.client
        if self._http is None or self._http.settings() != settings:
            if self._http is not None:
                self._http.close()
            self._http = SGLangClient(**settings)
        return self._http

    # ------------------------------------------------------------------ one attempt, distributed
    def _attempt_distributed(self, version: int, final: bool) -> tuple[bool, str, bool]:
        """One whole update from every stage's sender at once; returns (ok, error, worth retrying) on rank 0."""
        from erc_megatron.weights.hf_stream import is_bucket_receiver, iter_hf_weights, plan_hf_buckets
        from megatron.core import parallel_state as ps

        multi = dist.is_initialized() and dist.get_world_size() > 1
        stage, stages = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
        sender = is_bucket_receiver("stage")
        # 1. rank 0 pauses the servers; every sender learns which servers are in rotation and how to reach them
        start: list = [None]
        if self.rank == 0:
            try:
                self.client.pause_generation()
                self.client.flush_cache()
                start = [("", self.client.live_urls, self.client.settings())]
            except Exception as exc:  # noqa: BLE001 - reported and retried as a whole
                self._retire_if_gone(exc)
                start = [(f"{type(exc).__name__}: {exc}", self.client.live_urls, None)]
        if multi:
            dist.broadcast_object_list(start, src=0)
        error, urls, settings = start[0]
        ok, retry, gone, sent, waited = not error, True, [], 0, 0.0
        # 2. each stage's sender gathers its own stage and broadcasts it over its own group; nothing
        # crosses the pipeline. Every bucket is staged (flush_cache=false, no version): see the commit below.
        if sender and ok:
            try:
                self._http = self._sender_client(settings)
                name = self._stage_group_name(stage)
                if self.group is not None and (self._urls != urls or self._group_name != name):
                    self._reset_group()  # a server left the rotation: the group is rebuilt without it
                if self.group is None:
                    self._connect(urls, name)
            except Exception as exc:  # noqa: BLE001
                ok, error, retry = False, f"{type(exc).__name__}: {exc}", not _is_rejection(exc)
                gone += self._gone(exc)
        # Every group is joined before any bucket goes out: a server drops what it staged when a
        # group (re)joins, which must not be another stage's first buckets.
        send = ok
        if multi and not start[0][0]:  # the same on every rank
            joined = [None] * dist.get_world_size()
            dist.all_gather_object(joined, ok)
            send = ok and all(joined)
        buffers = self._transfer_buffers()
        buckets = iter_hf_weights(self.learner.model, self.model_cfg, self.bucket_bytes, dtype=self.dtype,
                                  destination=SENDERS["distributed"], buffers=buffers)
        if sender:
            total = len(plan_hf_buckets(self.model_cfg, stages, self.bucket_bytes, self.dtype)[stage])
            prefetch = _Prefetch(buckets, cuda=torch.cuda.is_available())
            index = 0
            for names, dtypes, shapes, flat, ready in prefetch:
                index += 1
                if not (ok and send):
                    buffers.release(flat)
                    continue  # the rest is still gathered: the TP peers take part in those collectives
                try:
                    if ready is not None:  # gathered on the producer's CUDA stream
                        torch.cuda.current_stream().wait_event(ready)
                        flat.record_stream(torch.cuda.current_stream())
                    self._send_bucket(names, dtypes, shapes, flat)
                    sent += flat.numel()
                    buffers.release(flat)  # broadcast done: the producer may refill it
                except Exception as exc:  # noqa: BLE001 - an aborted broadcast may still read it: not released
                    ok, error, retry = False, f"{type(exc).__name__}: {exc}", not _is_rejection(exc)
                    gone += self._gone(exc)
            waited = prefetch.waited_s
            try:
                prefetch.join()
                if ok and send and index != total:
                    raise RuntimeError(f"stage {stage} produced {index} buckets, the plan has {total}")
            except Exception as exc:  # noqa: BLE001
                ok, error = False, error or f"{type(exc).__name__}: {exc}"
        else:
            for _ in buckets:  # only the TP gathers
                pass
        # 3. every sender's outcome, to every rank
        mine = (stage, ok, error, retry, gone, sent, waited) if sender else None
        outcomes = [mine]
        if multi:
            outcomes = [None] * dist.get_world_size()
            dist.all_gather_object(outcomes, mine)
        outcomes = [o for o in outcomes if o is not None]
        failed = [o for o in outcomes if not o[1]]
        ok = not start[0][0] and not failed
        if not ok:  # the same message on every rank
            error = start[0][0] or "; ".join(dict.fromkeys((f"stage {o[0]}: " if stages > 1 else "") + o[2]
                                                           for o in failed))
            retry = all(o[3] for o in failed)
        self.last_bytes = sum(o[5] for o in outcomes)
        self.last_gather_wait_s = max((o[6] for o in outcomes), default=0.0)
        # After a failure the groups are torn down on the servers first: that also ends a broadcast
        # still pending on an aborted group, which the learner side's teardown would otherwise wait out.
        if self.rank != 0:
            if not ok and self.group is not None:
                self._reset_group()  # rank 0 tears every stage's group down on the servers too, below
            return ok, error, retry
        for url, why in (g for o in outcomes for g in o[4]):
            self._mark_gone(url, why)
        # 4. the commit, on rank 0 once every stage's buckets arrived. The embedded server applies every
        # staged bucket at /flush_cache, between two engine steps; an SGLang server applied each at
        # once, and generation stayed paused. The version changes only after that.
        try:
            if ok:
                self.client.flush_cache()
                self.client.update_weight_version(str(version), abort_all_requests=False, urls=urls)
        except Exception as exc:  # noqa: BLE001
            ok, error = False, f"{type(exc).__name__}: {exc}"
            self._retire_if_gone(exc)
        if not ok:
            # before generation continues: tearing every stage's group down makes the embedded
            # server drop what it staged, so it keeps all old weights
            self._destroy_server_groups(urls)
            self._reset_group(on_servers=False)
        if ok or final or not retry:
            try:
                self.client.continue_generation()
            except Exception as exc:  # noqa: BLE001
                ok, error = False, error or f"{type(exc).__name__}: {exc}"
        return ok, error, retry

    def _destroy_server_groups(self, urls: list[str]) -> None:
        from erc_megatron.rollout.client import SGLangError

        for url in urls:
            for name in self.group_names:
                try:
                    self.client.destroy_weights_update_group(url, name)
                except SGLangError:  # already gone ("does not exist"), or a dead server
                    pass

    # ------------------------------------------------------------------ one attempt, colocated
    def _attempt_tensor(self, version: int) -> tuple[bool, str, bool]:
        """One whole colocated update from rank 0; returns (ok, error, worth retrying) on rank 0."""
        from erc_megatron.weights.hf_stream import iter_hf_weights, plan_hf_buckets
        from megatron.core import parallel_state as ps

        total = sum(len(s) for s in plan_hf_buckets(self.model_cfg, ps.get_pipeline_model_parallel_world_size(),
                                                    self.bucket_bytes, self.dtype))
        buffers = self._transfer_buffers()
        buckets = iter_hf_weights(self.learner.model, self.model_cfg, self.bucket_bytes, dtype=self.dtype,
                                  destination=SENDERS["tensor"], buffers=buffers)
        if self.rank != 0:
            for _ in buckets:  # other ranks only take part in the gathers
                pass
            return True, "", True
        ok, error, retry, sent = True, "", True, 0
        try:
            self._urls = self.client.live_urls
            self._tp_sizes = [int(self.client.get_server_info()[u].get("tp_size", 1) or 1) for u in self._urls]
            self.client.pause_generation()
            self.client.flush_cache()
        except Exception as exc:  # noqa: BLE001 - reported and retried as a whole
            ok, error = False, f"{type(exc).__name__}: {exc}"
            self._retire_if_gone(exc)
        prefetch = _Prefetch(buckets, cuda=torch.cuda.is_available())
        index = 0
        for names, dtypes, shapes, flat, ready in prefetch:
            index += 1
            if not ok:
                continue
            try:
                if ready is not None:
                    torch.cuda.current_stream().wait_event(ready)
                    flat.record_stream(torch.cuda.current_stream())
                last = index == total
                self._send_tensor_bucket(names, dtypes, shapes, flat, str(version) if last else None, last)
                sent += flat.numel()
                buffers.release(flat)
            except Exception as exc:  # noqa: BLE001
                ok, error, retry = False, f"{type(exc).__name__}: {exc}", not _is_rejection(exc)
                self._retire_if_gone(exc)
        self.last_gather_wait_s = prefetch.waited_s
        try:
            prefetch.join()
            if ok and index != total:
                raise RuntimeError(f"the learner produced {index} buckets, the plan has {total}")
        except Exception as exc:  # noqa: BLE001
            ok, error = False, error or f"{type(exc).__name__}: {exc}"
        if not ok:
            self._drop_staged_tensors()
        try:
            self.client.continue_generation()
        except Exception as exc:  # noqa: BLE001
            ok, error = False, error or f"{type(exc).__name__}: {exc}"
        self.last_bytes = sent
        return ok, error, retry

    def _transfer_buffers(self):
        """The stream's buffers: on CPU the same ones every sync (fresh pages cost more than the copies,
        see weights/transfer_buffers). On CUDA new scratch per sync, so nothing stays held between
        syncs, and no bucket reuse: a broadcast enqueued on the sender's stream may still read a bucket
        the producer's stream would refill (the caching allocator's record_stream covers a freed one)."""
        from erc_megatron.weights.transfer_buffers import TransferBuffers

        if torch.cuda.is_available():
            return TransferBuffers(reuse_buckets=False)
        if self._buffers is None:
            self._buffers = TransferBuffers()
        return self._buffers

    def _send_bucket(self, names, dtypes, shapes, flat: torch.Tensor) -> None:
        """Announce one bucket (staged: flush_cache=false, no version) to every server and broadcast it;
        a server's refusal ends it at once.

        A server may refuse before it receives anything (SGLang parses dtypes before its
        broadcast), which would leave this broadcast waiting for the group timeout: the answers
        are watched while it runs, and a refusal aborts the group, so the caller reports the
        server's message within seconds and the group is rebuilt for the next sync.
        """
        http = self._http
        futures = [http.submit(http.update_weights_from_distributed, url, names, dtypes, shapes,
                               self._group_name, None, "flattened_bucket", False)
                   for url in self._urls]
        work = dist.broadcast(flat, src=0, group=self.group, async_op=True)
        deadline = time.monotonic() + self.timeout_s
        pending = set(futures)
        while not work.is_completed():
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed or time.monotonic() > deadline:
                self._abort_group()
                if failed:
                    raise failed[0].exception()
                raise TimeoutError(f"broadcast of {flat.numel()} bytes to {self._urls} not done within "
                                   f"{self.timeout_s:.0f}s")
            if pending:
                wait(pending, timeout=0.002, return_when=FIRST_COMPLETED)
                pending = {f for f in pending if not f.done()}
            else:
                time.sleep(0.001)
        work.wait()
        for f in futures:
            f.result(timeout=max(1.0, deadline - time.monotonic()))

    def _send_tensor_bucket(self, names, dtypes, shapes, flat: torch.Tensor, version: str | None,
                            last: bool) -> None:
        """Colocated: the bucket's bytes go through shared memory, only handles go over HTTP."""
        from erc_megatron.rollout.flat_bucket import unflatten_tensors
        from erc_megatron.rollout.tensor_payload import encode_named_tensors

        flat = flat.reshape(-1).view(torch.uint8)
        if self._shared is None or self._shared.numel() < flat.numel():
            self._shared = torch.empty(max(flat.numel(), self.bucket_bytes), dtype=torch.uint8).share_memory_()
        buf = self._shared[:flat.numel()]
        buf.copy_(flat)
        payload = encode_named_tensors(list(zip(names, unflatten_tensors(buf, list(dtypes), shapes))))
        futures = [self.client.submit(self.client.update_weights_from_tensor, url, [payload] * tp, None, last, False,
                                      version) for url, tp in zip(self._urls, self._tp_sizes)]
        for f in futures:  # the server has copied the tensors out once it answers: buf may be reused
            f.result(timeout=self.timeout_s)

    def _drop_staged_tensors(self) -> None:
        """Tensor mode has no group to tear down: an empty update is refused, and a refusal makes the
        embedded server drop what earlier calls staged (an SGLang server has applied them already)."""
        for url in self._urls:
            try:
                self.client.update_weights_from_tensor(url, [], flush_cache=False)
            except Exception:  # noqa: BLE001 - the refusal is the point
                pass

    @staticmethod
    def _gone(exc: BaseException) -> list[tuple[str, str]]:
        """[(url, why)] for a server that cannot be reached or answers 5xx; rank 0 decides on retiring it."""
        from erc_megatron.rollout.client import SGLangError

        if isinstance(exc, SGLangError) and (exc.status is None or exc.status >= 500):
            return [(exc.url, exc.message)]
        return []

    def _retire_if_gone(self, exc: BaseException) -> None:
        for url, why in self._gone(exc):
            self._mark_gone(url, why)

    def _mark_gone(self, url: str, why: str) -> None:
        """A gone server leaves the rotation while others remain; the next attempt then updates the
        rest. The last server is never retired: its error is reported."""
        if url in self.client.urls and len(self.client.live_urls) > 1:
            self.client.mark_dead(url, f"weight sync: {why}")

    def _abort_group(self) -> None:
        from erc_megatron.patches.custom_process_group import abort_custom_process_group

        if self.group is not None:
            abort_custom_process_group(self.group)

    def sync(self, version: int) -> None:
        error, urls = "", []
        for attempt in range(1, self.max_attempts + 1):
            t0 = time.perf_counter()
            if self.mode == "tensor":
                ok, error, retry = self._attempt_tensor(version)
            else:
                ok, error, retry = self._attempt_distributed(version, final=attempt == self.max_attempts)
            # rank 0 alone commits: every rank learns the outcome, the cause and the servers
            outcome = [(ok, error, retry, list(getattr(self.client, "urls", [])))]
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast_object_list(outcome, src=0)
            ok, error, retry, urls = outcome[0]
            if not ok and self.group is not None:
                self._reset_group(on_servers=False)  # the commit failed; rank 0 tore the groups down on the servers
            if ok:
                if self.rank == 0:
                    log.info("weight sync v%d: %.1f MB in %.2fs", version, self.last_bytes / 2**20,
                             time.perf_counter() - t0)
                return
            if self.rank == 0:
                log.warning("weight sync v%d attempt %d/%d failed: %s", version, attempt, self.max_attempts, error)
                print(f"[erc-megatron] weight sync v{version} attempt {attempt}/{self.max_attempts} failed: {error}",
                      flush=True)
            if not retry:
                raise RuntimeError(
                    f"weight sync v{version}: a rollout server of {urls} rejected a bucket, not retried: {error}. "
                    "Its weight_version was not bumped; the embedded server kept all old weights, an SGLang server "
                    "may hold the buckets sent before the rejected one")
        raise RuntimeError(f"weight sync v{version} to rollout servers {urls} failed {self.max_attempts} times; "
                           f"last error: {error}. The servers may hold partial weights (their weight_version "
                           "was not bumped)")

    def _reset_group(self, on_servers: bool = True) -> None:
        """After a failure the group may be broken: tear it down here (and on the servers), rebuild next attempt."""
        from erc_megatron.patches.custom_process_group import destroy_custom_process_group

        if self.group is None:
            return
        for url in self._urls if on_servers else ():
            try:
                self._http.destroy_weights_update_group(url, self._group_name)
            except Exception as exc:  # noqa: BLE001 - a dead server cannot be told
                if getattr(exc, "status", None) != 400:  # 400: already gone (rank 0 tears all groups down)
                    log.warning("destroy_weights_update_group on %s: %s", url, exc)
        try:
            destroy_custom_process_group(self.group)
        except Exception:  # noqa: BLE001
            pass
        self.group = None

    def close(self) -> None:
        self._buffers = None
        if self.group is not None:
            self._reset_group()
        if self.rank != 0 and self._http is not None:
            self._http.close()
            self._http = None
