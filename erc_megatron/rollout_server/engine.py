"""A small continuous-batching generation engine over a Hugging Face causal LM (CPU, float32).

One scheduler thread owns the model. Each step it admits waiting requests (one left-padded
prefill for the new group, whose KV cache is then merged into the running batch, see
`kv_cache`) and runs one decode step for every running row; finished rows leave the batch at
once. Requests that arrive concurrently therefore share forward passes whatever the HTTP
request they came in. Every request samples with its own `torch.Generator`, so a seeded
request gives the same tokens whatever else shares its batch (up to float32 rounding of
padded vs unpadded attention).

Finish rules follow SGLang's `Req.update_finish_state`: length first, then stop strings (on
the decoded tail of the output), then EOS / stop_token_ids (both ignored under ignore_eos).
Pausing follows SGLang's `/pause_generation` modes: "abort" (default) aborts everything in
the engine, "retract" moves running requests back to the queue and drops their KV cache (they
are re-prefilled with their partial output on continue), "in_place" just stops stepping.
Weight updates run between steps through `exclusive()`.

This is a development engine for CPU tests and demos, not an SGLang replacement.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from erc_megatron.patches import transformers_kv_cache as kv_cache
from .sampling import SamplingParams, logprob_vector, sample_token, top_logprobs

log = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "retract", "in_place")


@dataclass(eq=False)
class Request:
    """One sequence to generate (a prompt expanded n times is n requests)."""

    rid: str
    """Request id; aborts match it by prefix, as SGLang's scheduler does."""
    input_ids: list[int]
    """Prompt token ids."""
    params: SamplingParams
    """Sampling parameters (n already expanded away)."""
    seed: int
    """Seed of this request's own sampler."""
    return_logprob: bool = False
    """Record logprobs of the sampled tokens (and of the prompt from logprob_start_len)."""
    logprob_start_len: int = -1
    """First prompt position whose logprob is returned; -1 means output tokens only."""
    top_logprobs_num: int = 0
    """Also record the k most likely tokens at each recorded position."""

    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[tuple[list[float], list[int]]] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[tuple[list[float], list[int]] | None] = field(default_factory=list)
    finish_reason: dict | None = None
    num_retractions: int = 0
    """Times /pause_generation mode=retract sent it back to the queue (SGLang's meta_info field)."""
    error: str | None = None
    created: float = field(default_factory=time.perf_counter)
    finished_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    # Scheduler-private state.
    _generator: torch.Generator | None = None
    _max_new_tokens: int = 0
    _stop_window: int = 0

    @property
    def e2e_latency(self) -> float:
        return (self.finished_at or time.perf_counter()) - self.created


class EngineStoppedError(RuntimeError):
    """The engine was shut down."""


class Engine:
    """Owns the model; `generate` from any thread, control calls from any thread."""

    def __init__(self, model, tokenizer=None, eos_token_ids=(), max_running_requests: int = 64,
                 return_original_logprob: bool = False):
        if max_running_requests < 1:
            raise ValueError(f"max_running_requests must be at least 1, got {max_running_requests}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        # Fast tokenizers can raise "Already borrowed" when used from several threads at once.
        self.tokenizer_lock = threading.Lock()
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_running_requests = max_running_requests
        self.return_original_logprob = return_original_logprob
        self.context_length = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.vocab_size = int(model.config.vocab_size)

        self._cond = threading.Condition()
        self._step_lock = threading.Lock()  # held for a whole forward step; taken before _cond
        self._waiting: deque[Request] = deque()
        self._paused = False
        self._stopped = False
        # Running batch: touched only with _step_lock held.
        self._rows: list[Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self.steps = 0
        self.released: set[str] = set()  # memory tags given up by release_memory
        self._weights_backup: str | None = None
        self._thread = threading.Thread(target=self._loop, name="rollout-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- public API
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    @property
    def paused(self) -> bool:
        return self._paused

    def num_requests(self) -> int:
        with self._cond:
            return len(self._waiting) + len(self._rows)

    def submit(self, requests: list[Request]) -> None:
        if self.released:
            raise ValueError(f"the server's {sorted(self.released)} memory is released by /release_memory_occupation; "
                             "POST /resume_memory_occupation before generating")
        for req in requests:
            self._check(req)
        with self._cond:
            if self._stopped:
                raise EngineStoppedError("the rollout engine is shut down")
            self._waiting.extend(requests)
            self._cond.notify_all()

    def generate(self, requests: list[Request]) -> list[Request]:
        """Submit and block until every request has finished (or failed)."""
        self.submit(requests)
        for req in requests:
            req.done.wait()
        return requests

    def abort(self, rid: str = "", abort_all: bool = False, message: str = "Aborted by /abort_request") -> int:
        """Abort requests whose rid starts with `rid` (all of them with abort_all); returns the count."""
        def match(req: Request) -> bool:
            return abort_all or (bool(rid) and req.rid.startswith(rid))
        with self._step_lock:
            return self._abort_matching(match, message)

    def pause(self, mode: str = "abort") -> int:
        """Stop scheduling; returns how many requests were aborted or retracted."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        with self._step_lock:
            with self._cond:
                self._paused = True
            if mode == "abort":
                return self._abort_matching(lambda r: True, "Aborted by /pause_generation")
            if mode == "retract":
                rows = self._rows
                for req in rows:
                    req.num_retractions += 1
                self._rows, self._cache, self._mask = [], None, None
                with self._cond:
                    self._waiting.extendleft(reversed(rows))
                return len(rows)
            return 0

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def release_memory(self, tags: list[str]) -> None:
        """Give up the model's weights ("weights": written to a file, then freed) and/or the KV cache.

        SGLang requires an idle engine for this; so does this one. Requests are refused until the
        tags are resumed.
        """
        with self._step_lock:
            if self.num_requests():
                raise ValueError(f"cannot release memory with {self.num_requests()} requests in flight; "
                                 "POST /pause_generation or wait for them first")
            if "kv_cache" in tags:
                self._rows, self._cache, self._mask = [], None, None
            if "weights" in tags and "weights" not in self.released:
                tensors = self._unique_tensors()
                fd, path = tempfile.mkstemp(prefix="erc-rollout-weights-", suffix=".pt")
                os.close(fd)
                torch.save({name: t.data for name, t in tensors.items()}, path)
                for t in tensors.values():
                    t.data = torch.empty(0, dtype=t.dtype)
                self._weights_backup = path
            self.released.update(set(tags) & {"weights", "kv_cache"})  # CPU: no CUDA graphs

    def resume_memory(self, tags: list[str]) -> None:
        """Take back what `release_memory` gave up: the weights as they were at release."""
        with self._step_lock:
            if "weights" in tags and self._weights_backup is not None:
                saved = torch.load(self._weights_backup, weights_only=True)
                for name, t in self._unique_tensors().items():
                    t.data = saved[name]
                os.unlink(self._weights_backup)
                self._weights_backup = None
            self.released.difference_update(tags)

    def _unique_tensors(self) -> dict[str, torch.Tensor]:
        # tied parameters are one Parameter object under two names: restore it once
        out, seen = {}, set()
        for name, t in self.model.state_dict(keep_vars=True).items():
            if id(t) not in seen:
                seen.add(id(t))
                out[name] = t
        return out

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the model between two forward steps (for weight updates)."""
        with self._step_lock:
            yield self.model

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        with self._step_lock, self._cond:
            for req in list(self._waiting) + self._rows:
                self._fail(req, "the rollout engine shut down before the request finished")
            self._waiting.clear()
            self._rows, self._cache, self._mask = [], None, None

    # ----------------------------------------------------------------- scheduling
    def _check(self, req: Request) -> None:
        if not req.input_ids:
            raise ValueError("input_ids cannot be empty.")
        if any(not 0 <= t < self.vocab_size for t in req.input_ids):
            raise ValueError(f"input_ids must be in [0, {self.vocab_size}) for this model")
        if len(req.input_ids) >= self.context_length:
            raise ValueError(f"The input ({len(req.input_ids)} tokens) is longer than the model's "
                             f"context length ({self.context_length} tokens).")
        if req.params.stop and self.tokenizer is None:
            raise ValueError(f"stop={req.params.stop!r} needs a tokenizer, and this server has none")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (self._paused or (not self._waiting and not self._rows)):
                    self._cond.wait()
                if self._stopped:
                    return
            with self._step_lock:
                with self._cond:
                    if self._paused:
                        continue
                    room = self.max_running_requests - len(self._rows)
                    new = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                try:
                    with torch.no_grad():
                        if new:
                            self._prefill(new)
                        if self._rows:
                            self._decode()
                    self.steps += 1
                except Exception as exc:  # noqa: BLE001 - reported to every affected request
                    log.exception("rollout engine step failed")
                    for req in new + self._rows:
                        self._fail(req, f"engine step failed: {type(exc).__name__}: {exc}")
                    self._rows, self._cache, self._mask = [], None, None

    def _admit(self, req: Request) -> None:
        if req._generator is None:  # a retracted request keeps its sampler state
            req._generator = torch.Generator().manual_seed(req.seed)
            req._max_new_tokens = min(req.params.max_new_tokens, self.context_length - len(req.input_ids))
            if req.params.stop:
                # SGLang decodes the last (longest stop string in tokens + 1) tokens; we also allow
                # for tokens shorter than one character.
                with self.tokenizer_lock:
                    lengths = [max(len(self.tokenizer.encode(s, add_special_tokens=False)), len(s))
                               for s in req.params.stop]
                req._stop_window = 1 + max(lengths)

    def _prefill(self, group: list[Request]) -> None:
        for req in group:
            self._admit(req)
        contexts = [req.input_ids + req.output_ids for req in group]
        length = max(len(c) for c in contexts)
        ids = torch.zeros(len(group), length, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.long)
        for i, ctx in enumerate(contexts):
            ids[i, length - len(ctx):] = torch.tensor(ctx)
            mask[i, length - len(ctx):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        want_prompt = any(r.return_logprob and r.logprob_start_len >= 0 and not r.output_ids for r in group)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=DynamicCache(), use_cache=True,
                         logits_to_keep=0 if want_prompt else 1)
        logits = out.logits.float()
        keep = []
        for i, req in enumerate(group):
            if want_prompt and req.return_logprob and req.logprob_start_len >= 0 and not req.output_ids:
                self._record_prompt_logprobs(req, logits[i, length - len(req.input_ids):])
            if req._max_new_tokens - len(req.output_ids) <= 0:
                self._finish(req, {"type": "length", "length": req._max_new_tokens})
                continue
            if not self._append(req, logits[i, -1]):
                keep.append(i)
        if not keep:
            return
        cache, mask = kv_cache.select_rows(out.past_key_values, mask, keep)
        if self._rows:
            self._cache, self._mask = kv_cache.merge(self._cache, self._mask, cache, mask)
        else:
            self._cache, self._mask = cache, mask
        self._rows = self._rows + [group[i] for i in keep]

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[req.output_ids[-1]] for req in rows])
        positions = torch.tensor([[len(req.input_ids) + len(req.output_ids) - 1] for req in rows])
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=self._mask.dtype)], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=self._cache, use_cache=True)
        logits = out.logits[:, -1].float()
        keep = [i for i, req in enumerate(rows) if not self._append(req, logits[i])]
        if len(keep) == len(rows):
            self._cache, self._mask = out.past_key_values, mask
        elif keep:
            self._cache, self._mask = kv_cache.select_rows(out.past_key_values, mask, keep)
            self._rows = [rows[i] for i in keep]
        else:
            self._rows, self._cache, self._mask = [], None, None

    # ----------------------------------------------------------------- per-request steps
    def _append(self, req: Request, logits: torch.Tensor) -> bool:
        """Sample the next token of `req` from `logits`; True if the request finished."""
        token = sample_token(logits, req.params, req._generator)
        req.output_ids.append(token)
        if req.return_logprob:
            logprobs = logprob_vector(logits, req.params, self.return_original_logprob)
            req.output_logprobs.append(float(logprobs[token]))
            if req.top_logprobs_num > 0:
                req.output_top_logprobs.append(top_logprobs(logprobs, req.top_logprobs_num))
        reason = self._finish_reason(req, token)
        if reason is not None:
            self._finish(req, reason)
            return True
        return False

    def _finish_reason(self, req: Request, token: int) -> dict | None:
        if len(req.output_ids) >= req._max_new_tokens:
            return {"type": "length", "length": req._max_new_tokens}
        if req.params.stop:
            with self.tokenizer_lock:
                tail = self.tokenizer.decode(req.output_ids[-req._stop_window:])
            for stop in req.params.stop:
                if stop in tail:
                    return {"type": "stop", "matched": stop}
        if not req.params.ignore_eos and (token in req.params.stop_token_ids or token in self.eos_token_ids):
            return {"type": "stop", "matched": token}
        return None

    def _record_prompt_logprobs(self, req: Request, logits: torch.Tensor) -> None:
        """Prompt logprobs from logprob_start_len on; position 0 has none (as in SGLang)."""
        for pos in range(req.logprob_start_len, len(req.input_ids)):
            if pos == 0:
                req.input_logprobs.append(None)
                if req.top_logprobs_num > 0:
                    req.input_top_logprobs.append(None)
                continue
            logprobs = logprob_vector(logits[pos - 1], req.params, self.return_original_logprob)
            req.input_logprobs.append(float(logprobs[req.input_ids[pos]]))
            if req.top_logprobs_num > 0:
                req.input_top_logprobs.append(top_logprobs(logprobs, req.top_logprobs_num))

    def _finish(self, req: Request, reason: dict) -> None:
        req.finish_reason = reason
        req.finished_at = time.perf_counter()
        req.done.set()

    def _fail(self, req: Request, message: str) -> None:
        if not req.done.is_set():
            req.error = message
            self._finish(req, {"type": "abort", "message": message})

    def _abort_matching(self, match, message: str) -> int:
        """Finish matching requests with an abort reason. Caller holds _step_lock."""
        reason = {"type": "abort", "message": message}
        with self._cond:
            waiting = [r for r in self._waiting if match(r)]
            self._waiting = deque(r for r in self._waiting if not match(r))
        for req in waiting:
            self._finish(req, dict(reason))
        keep = [i for i, req in enumerate(self._rows) if not match(req)]
        dropped = [req for req in self._rows if match(req)]
        for req in dropped:
            self._finish(req, dict(reason))
        if dropped:
            if keep:
                self._cache, self._mask = kv_cache.select_rows(self._cache, self._mask, keep)
                self._rows = [self._rows[i] for i in keep]
            else:
                self._rows, self._cache, self._mask = [], None, None
        return len(waiting) + len(dropped)
