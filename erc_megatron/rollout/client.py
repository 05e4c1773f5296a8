"""The learner's client for SGLang's native HTTP API (real SGLang servers, a router, or ours).

`generate` splits a batch of prompts into one contiguous chunk per server URL, posts the chunks
concurrently, and returns the results in SGLang's own order for the whole batch: with n > 1
sample-major (result j * num_prompts + i is sample j of prompt i), exactly as one SGLang
server would answer the whole batch; `group_by_prompt` regroups them.

Failures: connection errors and 5xx answers are retried with exponential backoff
(`backoff * 2**attempt`) up to `max_retries` times; 4xx answers are not retried. Every error
raised is an `SGLangError` naming the server URL, the endpoint and the server's message.
Endpoints that run a collective with the learner (`init_weights_update_group`,
`update_weights_from_distributed`) are never retried: a retry would desynchronise the broadcast.
Those calls block until the server has received the tensors, so the learner issues them from
a thread (`submit`) while it joins the group / broadcasts.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import requests
import torch

log = logging.getLogger(__name__)


class SGLangError(RuntimeError):
    """A rollout-server call failed; names the server URL, the endpoint and the server's message."""

    def __init__(self, url: str, endpoint: str, message: str, status: int | None = None):
        self.url, self.endpoint, self.status, self.message = url, endpoint, status, message
        where = f"{url}{endpoint}" + (f" (HTTP {status})" if status is not None else "")
        super().__init__(f"rollout server call {where} failed: {message}")


def _server_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if key in body:
                return str(body[key])
    return str(body)


def group_by_prompt(results: list[dict], num_prompts: int) -> list[list[dict]]:
    """Regroup sample-major results ([sample][prompt] flattened) into one list per prompt."""
    if num_prompts <= 0 or len(results) % num_prompts:
        raise ValueError(f"{len(results)} results do not split into {num_prompts} prompts")
    n = len(results) // num_prompts
    return [[results[j * num_prompts + i] for j in range(n)] for i in range(num_prompts)]


class SGLangClient:
    """HTTP client for one or more rollout servers (or a single router URL)."""

    def __init__(self, urls: list[str] | str, timeout: float = 3600.0, max_retries: int = 3,
                 backoff: float = 0.5, connect_timeout: float = 10.0, api_key: str | None = None):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("SGLangClient needs at least one server URL")
        if max_retries < 0 or backoff < 0 or timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeout and connect_timeout must be positive, max_retries and backoff >= 0")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.api_key = api_key
        self._session = requests.Session()
        if api_key:  # SGLang's --api-key
            self._session.headers["Authorization"] = f"Bearer {api_key}"
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sglang-client")  # for submit()
        self._lock = threading.Lock()
        self._in_flight = {u: 0 for u in self.urls}  # prompts sent and not yet answered, per server
        self.dead: dict[str, str] = {}  # servers taken out of rotation -> why

    @property
    def live_urls(self) -> list[str]:
        """Servers still in rotation (all of them until one fails after its retries)."""
        with self._lock:
            return [u for u in self.urls if u not in self.dead]

    def mark_dead(self, url: str, why: str) -> None:
        with self._lock:
            if url in self.dead:
                return
            self.dead[url] = why
            left = [u for u in self.urls if u not in self.dead]
        log.warning("rollout server %s taken out of rotation (%s); %d left: %s", url, why, len(left), left)

    def _split(self, num: int) -> list[tuple[str, int, int]]:
        """Contiguous chunks over the live servers, sized inversely to the prompts each has in flight."""
        urls = self.live_urls
        if not urls:
            raise SGLangError(",".join(self.urls), "/generate", f"no rollout server left in rotation: {self.dead}")
        with self._lock:
            weights = [1.0 / (1 + self._in_flight[u]) for u in urls]
        shares = [num * w / sum(weights) for w in weights]
        sizes = [int(x) for x in shares]
        for k in sorted(range(len(urls)), key=lambda k: sizes[k] - shares[k])[:num - sum(sizes)]:
            sizes[k] += 1
        chunks, lo = [], 0
        for url, size in zip(urls, sizes):
            if size:
                chunks.append((url, lo, lo + size))
                lo += size
        return chunks

    def settings(self, urls: list[str] | None = None) -> dict:
        """Keyword arguments for an equal client on another learner rank (a pipeline stage's weight sender)."""
        return {"urls": list(urls if urls is not None else self.urls), "timeout": self.timeout,
                "max_retries": self.max_retries, "backoff": self.backoff, "connect_timeout": self.connect_timeout,
                "api_key": self.api_key}

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._session.close()

    def submit(self, fn, *args, **kwargs) -> Future:
        """Run a client call in the background (e.g. update_weights_from_distributed during a broadcast)."""
        return self._pool.submit(fn, *args, **kwargs)

    # ----------------------------------------------------------------- transport
    def _request(self, url: str, endpoint: str, payload: dict | None = None, method: str = "POST",
                 retry: bool = True, timeout: float | None = None) -> requests.Response:
        attempts = 1 + (self.max_retries if retry else 0)
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._session.request(method, url + endpoint, json=payload,
                                                  timeout=(self.connect_timeout, timeout or self.timeout))
            except requests.exceptions.ReadTimeout as exc:
                # The server accepted the request and is still working; resending duplicates the work.
                raise SGLangError(url, endpoint, f"no answer within {timeout or self.timeout:.0f}s ({exc})") from exc
            except requests.exceptions.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
                log.warning("%s%s attempt %d/%d: %s", url, endpoint, attempt + 1, attempts, last)
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {_server_message(response)}"
                log.warning("%s%s attempt %d/%d: %s", url, endpoint, attempt + 1, attempts, last)
                continue
            if response.status_code >= 400:
                raise SGLangError(url, endpoint, _server_message(response), response.status_code)
            return response
        raise SGLangError(url, endpoint, f"{last} (after {attempts} attempt{'s' if attempts > 1 else ''})")

    def _json(self, url: str, endpoint: str, payload: dict | None = None, method: str = "POST", **kw):
        response = self._request(url, endpoint, payload, method, **kw)
        try:
            return response.json()
        except ValueError as exc:
            raise SGLangError(url, endpoint, f"answer is not JSON: {response.text[:200]!r}") from exc

    @staticmethod
    def _fanout(fn, items: list) -> list:
        """fn over items concurrently; a fresh pool per call, so calls nest without deadlock."""
        if len(items) == 1:
            return [fn(items[0])]
        with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="sglang-fanout") as pool:
            return list(pool.map(fn, items))

    def _on_all(self, fn, urls: list[str] | None = None) -> dict[str, object]:
        urls = [u.rstrip("/") for u in (urls or self.live_urls)]
        return dict(zip(urls, self._fanout(fn, urls)))

    # ----------------------------------------------------------------- generation
    def wait_healthy(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        """Block until every server answers /health with 200, or raise after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        pending = list(self.urls)
        last = {}
        while pending:
            for url in list(pending):
                try:
                    status = self._session.get(url + "/health", timeout=(self.connect_timeout, 30)).status_code
                    if status == 200:
                        pending.remove(url)
                    last[url] = f"HTTP {status}"
                except requests.RequestException as exc:
                    last[url] = f"{type(exc).__name__}: {exc}"
            if not pending:
                return
            if time.monotonic() > deadline:
                url = pending[0]
                raise SGLangError(url, "/health", f"not healthy within {timeout:.0f}s (last: {last[url]}); "
                                  f"unhealthy servers: {pending}")
            time.sleep(interval)

    def generate(self, prompts_input_ids: list[list[int]], sampling_params: dict | list[dict],
                 return_logprob: bool = False, **fields) -> list[dict]:
        """Generate for a batch of token-id prompts; results sample-major over the whole batch.

        `sampling_params` is one dict for all prompts or a list with one dict per prompt (as
        SGLang accepts); `n` must then agree across the list. Extra SGLang /generate fields
        (logprob_start_len, top_logprobs_num, ...) pass through unchanged.
        """
        num = len(prompts_input_ids)
        if num == 0:
            return []
        if any(not isinstance(p, list) or not p for p in prompts_input_ids):
            raise ValueError("prompts_input_ids must be a list of non-empty lists of token ids")
        per_prompt = isinstance(sampling_params, list)
        if per_prompt and len(sampling_params) != num:
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {num} prompts")
        ns = {int(p.get("n", 1) or 1) for p in (sampling_params if per_prompt else [sampling_params])}
        if len(ns) != 1:
            raise ValueError(f"sampling_params must use one n for the whole batch, got {sorted(ns)}")
        n = ns.pop()
        chunks = self._split(num)

        def run(chunk):
            url, lo, hi = chunk
            payload = {"input_ids": prompts_input_ids[lo:hi],
                       "sampling_params": sampling_params[lo:hi] if per_prompt else sampling_params,
                       "return_logprob": return_logprob, **fields}
            with self._lock:
                self._in_flight[url] += hi - lo
            try:
                out = self._json(url, "/generate", payload)
            except SGLangError as exc:
                if exc.status is not None and exc.status < 500 or len(self.live_urls) <= 1:
                    raise  # the request itself is refused, or there is nowhere else to send it
                # the server is gone or failing: out of rotation, its prompts go to the others
                self.mark_dead(url, exc.message)
                # generate() of the sub-batch answers sample-major over it: what this server would have sent
                return self.generate(prompts_input_ids[lo:hi], payload["sampling_params"], return_logprob, **fields)
            finally:
                with self._lock:
                    self._in_flight[url] -= hi - lo
            if not isinstance(out, list) or len(out) != (hi - lo) * n:
                raise SGLangError(url, "/generate", f"expected a list of {(hi - lo) * n} results, got "
                                  f"{type(out).__name__} of {len(out) if isinstance(out, list) else '?'}")
            return out

        parts = self._fanout(run, chunks)
        results = []
        for j in range(n):  # re-interleave per-server sample-major blocks into one sample-major batch
            for (_url, lo, hi), part in zip(chunks, parts):
                size = hi - lo
                results.extend(part[j * size:(j + 1) * size])
        return results

    # ----------------------------------------------------------------- control, all servers
    def pause_generation(self, mode: str | None = None) -> dict[str, dict]:
        payload = {} if mode is None else {"mode": mode}
        return self._on_all(lambda url: self._json(url, "/pause_generation", payload))

    def continue_generation(self) -> dict[str, dict]:
        return self._on_all(lambda url: self._json(url, "/continue_generation", {}))

    def flush_cache(self, timeout: float = 60.0, interval: float = 0.2) -> None:
        """POST /flush_cache until every server accepts (it refuses while requests are in flight)."""
        def flush(url):
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self._request(url, "/flush_cache", None, "POST")
                    return True
                except SGLangError as exc:
                    if exc.status != 400 or time.monotonic() > deadline:
                        raise
                time.sleep(interval)
        self._on_all(flush)

    def get_weight_version(self) -> dict[str, str]:
        return self._on_all(lambda url: self._json(url, "/get_weight_version", method="GET")["weight_version"])

    def get_model_info(self) -> dict[str, dict]:
        return self._on_all(lambda url: self._json(url, "/get_model_info", method="GET"))

    def get_server_info(self) -> dict[str, dict]:
        return self._on_all(lambda url: self._json(url, "/get_server_info", method="GET"))

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self._on_all(lambda url: self._request(url, "/abort_request", {"rid": rid, "abort_all": abort_all}))

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None,
                                 load_format: str | None = None, flush_cache: bool = True,
                                 abort_all_requests: bool = False, urls: list[str] | None = None) -> dict[str, dict]:
        payload = {"model_path": model_path, "load_format": load_format, "weight_version": weight_version,
                   "flush_cache": flush_cache, "abort_all_requests": abort_all_requests}
        return self._on_all(lambda url: self._update(url, "/update_weights_from_disk", payload, retry=True), urls)

    def update_weight_version(self, new_version: str, abort_all_requests: bool = False,
                              urls: list[str] | None = None) -> None:
        """SGLang's /update_weight_version: the version alone, after every bucket of an update arrived."""
        payload = {"new_version": new_version, "abort_all_requests": abort_all_requests}
        self._on_all(lambda url: self._update(url, "/update_weight_version", payload, retry=True), urls)

    def release_memory_occupation(self, tags: list[str] | None = None, urls: list[str] | None = None) -> None:
        """Colocated mode: the servers give up their weights / KV cache ("weights", "kv_cache"; None: all)."""
        self._on_all(lambda url: self._request(url, "/release_memory_occupation", {"tags": tags}), urls)

    def resume_memory_occupation(self, tags: list[str] | None = None, urls: list[str] | None = None) -> None:
        self._on_all(lambda url: self._request(url, "/resume_memory_occupation", {"tags": tags}), urls)

    def update_weights_from_tensor(self, url: str, serialized_named_tensors: list[str], load_format: str | None = None,
                                   flush_cache: bool = True, abort_all_requests: bool = False,
                                   weight_version: str | None = None) -> dict:
        """Colocated mode: one entry per SGLang TP rank of the server (tensor_payload.encode_named_tensors);
        the tensors must stay alive until this returns. Never retried (a partial bucket set is staged)."""
        payload = {"serialized_named_tensors": list(serialized_named_tensors), "load_format": load_format,
                   "flush_cache": flush_cache, "abort_all_requests": abort_all_requests,
                   "weight_version": weight_version}
        return self._update(url.rstrip("/"), "/update_weights_from_tensor", payload, retry=False)

    # ----------------------------------------------------------------- weight-update group, one server
    def init_weights_update_group(self, url: str, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = "weight_update_group",
                                  backend: str = "nccl") -> dict:
        payload = {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
                   "world_size": world_size, "group_name": group_name, "backend": backend}
        return self._update(url.rstrip("/"), "/init_weights_update_group", payload, retry=False)

    def update_weights_from_distributed(self, url: str, names: list[str], dtypes: list[torch.dtype | str],
                                        shapes: list[list[int]], group_name: str = "weight_update_group",
                                        weight_version: str | None = None, load_format: str | None = None,
                                        flush_cache: bool = True, abort_all_requests: bool = False) -> dict:
        payload = {"names": list(names), "dtypes": [dtype_name(d) for d in dtypes],
                   "shapes": [list(map(int, s)) for s in shapes], "group_name": group_name,
                   "weight_version": weight_version, "load_format": load_format,
                   "flush_cache": flush_cache, "abort_all_requests": abort_all_requests}
        return self._update(url.rstrip("/"), "/update_weights_from_distributed", payload, retry=False)

    def destroy_weights_update_group(self, url: str, group_name: str = "weight_update_group") -> dict:
        return self._update(url.rstrip("/"), "/destroy_weights_update_group", {"group_name": group_name}, retry=True)

    def _update(self, url: str, endpoint: str, payload: dict, retry: bool) -> dict:
        """Weight endpoints answer {"success", "message"}; success false (HTTP 400) raises."""
        out = self._json(url, endpoint, payload, retry=retry)
        if not out.get("success", False):
            raise SGLangError(url, endpoint, str(out.get("message")))
        return out


def dtype_name(dtype: torch.dtype | str) -> str:
    """SGLang's dtype spelling: 'bfloat16' for torch.bfloat16 (it calls getattr(torch, name))."""
    return str(dtype).removeprefix("torch.")
