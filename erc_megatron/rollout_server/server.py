"""Embedded rollout server speaking SGLang's native HTTP protocol (`erc-megatron serve`).

Endpoints, field names, defaults and response shapes follow `sglang.srt.entrypoints.http_server`
and the request classes of `sglang.srt.managers.io_struct` (SGLang 0.5.x), so the learner's
`SGLangClient` drives this server and a real SGLang server the same way. Differences are
limited to what a CPU development engine cannot do; those requests get a 400 naming the field.

Error bodies: `/generate` answers `{"error": {"message": ...}}` with status 400 (SGLang's
`_create_error_response`); malformed control requests answer SGLang's validation shape
`{"object": "error", "message": ..., "type": "Bad Request", "param": null, "code": 400}`;
weight-update endpoints answer `{"success": false, "message": ...}` with status 400.

Start it with `erc-megatron serve --model-path DIR`, in a thread with `start_server_in_thread`,
or as a child process (what the trainer does) with `launch_server_process`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import requests
import torch

from . import openai_api
from .engine import PAUSE_MODES, Engine, Request
from .sampling import SamplingParams, SamplingParamsError
from .weight_update import WeightUpdater

log = logging.getLogger(__name__)

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # sglang.srt.constants.GPU_MEMORY_ALL_TYPES

SERVER_VERSION = "erc-megatron-embedded-0.1"
_READY_LINE = "erc-megatron serve: listening on "
API_KEY_ENV = "ERC_MEGATRON_API_KEY"  # lets a parent pass the key without putting it on a command line
_MISSING = object()

# GenerateReqInput fields the embedded server accepts only at their default value.
_GENERATE_DEFAULT_ONLY = {
    "input_embeds": None, "image_data": None, "video_data": None, "audio_data": None,
    "lora_path": None, "lora_id": None, "custom_logit_processor": None, "session_params": None,
    "return_hidden_states": False, "return_routed_experts": False, "return_entropy": False,
    "token_ids_logprob": None, "bootstrap_host": None, "bootstrap_port": None, "bootstrap_room": None,
    "data_parallel_rank": None, "routed_dp_rank": None, "priority": None, "stream": False,
    "modalities": None,
}
_GENERATE_IGNORED = {"log_metrics", "background", "no_logs", "custom_labels", "extra_key", "cache_salt",
                     "conversation_id", "routing_key", "received_time", "external_trace_header"}
_GENERATE_FIELDS = {"text", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len",
                    "top_logprobs_num", "return_text_in_logprobs"}


@dataclass
class ServerArgs:
    """Settings of one embedded rollout server."""

    model_path: str
    """Hugging Face model directory (config, safetensors, optionally a tokenizer)."""
    tokenizer_path: str | None = None
    """Tokenizer directory; defaults to model_path. Without a tokenizer only input_ids work."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 30000
    """Port to listen on; 0 lets the OS choose (the chosen URL is logged)."""
    seed: int = 0
    """Seed of the stream that seeds requests without sampling_params.sampling_seed."""
    max_running_requests: int = 64
    """Most sequences decoded together; more wait in the queue."""
    weight_version: str = "default"
    """Initial weight_version reported in responses (SGLang's default is 'default')."""
    return_original_logprob: bool = False
    """Report logprobs before temperature, like SGLANG_RETURN_ORIGINAL_LOGPROB=1."""
    weight_update_timeout_s: float = 1800.0
    """Timeout of the weight-update process group (rendezvous and broadcasts)."""
    num_threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""
    api_key: str | None = None
    """SGLang's --api-key: every endpoint but /health*, /ready*, /metrics* then needs the header
    `Authorization: Bearer <key>` (401 {"error": "Unauthorized"} otherwise)."""

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model_path):
            raise ValueError(f"model_path {self.model_path!r} is not a directory")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be at least 1, got {self.max_running_requests}")
        if self.weight_update_timeout_s <= 0:
            raise ValueError(f"weight_update_timeout_s must be positive, got {self.weight_update_timeout_s}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        self.tokenizer_path = self.tokenizer_path or self.model_path
        if self.api_key == "":
            raise ValueError("api_key must be a non-empty string or None")


class BadRequest(ValueError):
    """A request the server refuses; becomes a 400 with this message."""


def load_model(model_path: str, tokenizer_path: str | None = None):
    """(float32 CPU model, tokenizer or None, EOS ids) from a Hugging Face directory."""
    import transformers  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    major_minor = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(model_path, **{dtype_kw: torch.float32}).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
    except Exception as exc:  # noqa: BLE001 - a tokenizer is optional (input_ids only)
        log.warning("no tokenizer at %s (%s); only input_ids requests will work", tokenizer_path or model_path, exc)
        tokenizer = None
    eos: set[int] = set()
    for source in (model.config, getattr(model, "generation_config", None)):
        value = getattr(source, "eos_token_id", None)
        eos.update([value] if isinstance(value, int) else (value or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    return model, tokenizer, sorted(eos)


class RolloutServer:
    """The endpoints, independent of the HTTP plumbing: each returns (status, JSON body or text)."""

    def __init__(self, args: ServerArgs):
        self.args = args
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.seed)
        self._rng = random.Random(args.seed)
        self._rng_lock = threading.Lock()
        model, self.tokenizer, eos = load_model(args.model_path, args.tokenizer_path)
        self.engine = Engine(model, self.tokenizer, eos, args.max_running_requests, args.return_original_logprob)
        self.updater = WeightUpdater(self.engine, timedelta(seconds=args.weight_update_timeout_s))
        self.weight_version = args.weight_version
        self._staged_version: str | None = None
        self.generate_calls = 0
        self.routes = {
            "/generate": self.generate,
            "/health": self.health, "/health_generate": self.health_generate,
            "/get_model_info": self.get_model_info, "/get_server_info": self.get_server_info,
            "/get_weight_version": self.get_weight_version, "/update_weight_version": self.update_weight_version,
            "/flush_cache": self.flush_cache,
            "/pause_generation": self.pause_generation, "/continue_generation": self.continue_generation,
            "/abort_request": self.abort_request,
            "/init_weights_update_group": self.init_weights_update_group,
            "/update_weights_from_distributed": self.update_weights_from_distributed,
            "/update_weights_from_disk": self.update_weights_from_disk,
            "/update_weights_from_tensor": self.update_weights_from_tensor,
            "/destroy_weights_update_group": self.destroy_weights_update_group,
            "/release_memory_occupation": self.release_memory_occupation,
            "/resume_memory_occupation": self.resume_memory_occupation,
            "/v1/models": lambda body: openai_api.models(self, body),
            "/v1/completions": lambda body: openai_api.completions(self, body),
            "/v1/chat/completions": lambda body: openai_api.chat_completions(self, body),
        }

    def shutdown(self) -> None:
        self.engine.stop()

    # ----------------------------------------------------------------- /generate
    def generate(self, body: dict):
        self.generate_calls += 1
        started = time.perf_counter()
        try:
            reqs, single = self._parse_generate(body)
            self.engine.submit(reqs)  # validates every request before any is queued
        except (BadRequest, SamplingParamsError, ValueError, TypeError) as exc:
            return HTTPStatus.BAD_REQUEST, {"error": {"message": str(exc)}}
        for req in reqs:
            req.done.wait()
        failed = [r for r in reqs if r.error]
        if failed:
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {"message": failed[0].error}}
        outputs = [self._output(r, body) for r in reqs]
        log.info("generate: %d seqs, %d prompt + %d completion tokens, %.2fs, weight_version=%s",
                 len(reqs), sum(len(r.input_ids) for r in reqs), sum(len(r.output_ids) for r in reqs),
                 time.perf_counter() - started, self.weight_version)
        return HTTPStatus.OK, outputs[0] if single else outputs

    def _parse_generate(self, body: dict) -> tuple[list[Request], bool]:
        for key, value in body.items():
            if key in _GENERATE_DEFAULT_ONLY:
                if value not in (None, _GENERATE_DEFAULT_ONLY[key]):
                    raise BadRequest(f"{key}={value!r} is not supported by the embedded rollout server")
            elif key not in _GENERATE_FIELDS and key not in _GENERATE_IGNORED:
                raise BadRequest(f"unknown /generate field {key!r}; supported: {sorted(_GENERATE_FIELDS)}")
        text, input_ids = body.get("text"), body.get("input_ids")
        if (text is None) == (input_ids is None):
            raise BadRequest("Either text, input_ids or input_embeds should be provided.")
        if text is not None:
            if self.tokenizer is None:
                raise BadRequest("text input needs a tokenizer, and this server has none; send input_ids")
            single = isinstance(text, str)
            texts = [text] if single else text
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise BadRequest("text must be a string or a list of strings")
            with self.engine.tokenizer_lock:
                prompts = [self.tokenizer.encode(t) for t in texts]
        else:
            if not isinstance(input_ids, list) or len(input_ids) == 0:
                raise BadRequest("input_ids cannot be empty.")
            single = not isinstance(input_ids[0], list)
            prompts = [input_ids] if single else input_ids
            for p in prompts:
                if not isinstance(p, list) or not p or \
                        not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                    raise BadRequest("input_ids must be a non-empty list of ints or a list of such lists")
        batch = len(prompts)
        if batch == 0:
            raise BadRequest("the batch is empty")

        raw_params = body.get("sampling_params")
        if isinstance(raw_params, list):
            if single or len(raw_params) != batch:
                raise BadRequest("a list of sampling_params needs one entry per prompt of a batch")
            params = [SamplingParams.from_request(p) for p in raw_params]
        elif raw_params is None or isinstance(raw_params, dict):
            params = [SamplingParams.from_request(raw_params)] * batch
        else:
            raise BadRequest("sampling_params must be a dict or a list of dicts")
        n = params[0].n
        if any(p.n != n for p in params):
            raise BadRequest("The parallel_sample_num should be the same for all samples in sample params.")
        if n > 1:
            single = False

        def per_prompt(name, default, kind):
            value = body.get(name)
            value = default if value is None else value
            values = value if isinstance(value, list) else [value] * batch
            if len(values) != batch or not all(isinstance(v, kind) and not (kind is int and isinstance(v, bool))
                                               for v in values):
                raise BadRequest(f"{name} must be a {kind.__name__} or a list of one per prompt, got {value!r}")
            return values

        return_logprob = per_prompt("return_logprob", False, bool)
        start_len = per_prompt("logprob_start_len", -1, int)
        top_num = per_prompt("top_logprobs_num", 0, int)
        for i, prompt in enumerate(prompts):
            if not -1 <= start_len[i] < len(prompt):
                raise BadRequest(f"logprob_start_len must be -1 or in [0, {len(prompt)}), got {start_len[i]}")
            if top_num[i] < 0:
                raise BadRequest(f"top_logprobs_num must be >= 0, got {top_num[i]}")

        rid = body.get("rid")
        if isinstance(rid, list) and len(rid) != batch:
            raise BadRequest("The specified rids length mismatch with the batch_size for batch processing.")
        if rid is not None and not isinstance(rid, (str, list)):
            raise BadRequest("The rid should be a string or a list of strings.")

        reqs = []
        for j in range(n):  # sample-major, like SGLang's GenerateReqInput expansion
            for i in range(batch):
                k = j * batch + i
                if rid is None:
                    rid_k = uuid.uuid4().hex
                elif isinstance(rid, str):
                    rid_k = rid if single else f"{rid}_{k}"
                else:
                    rid_k = str(rid[i]) if n == 1 else f"{rid[i]}_{j}"
                p = params[i]
                reqs.append(Request(
                    rid=rid_k, input_ids=list(prompts[i]), params=p, seed=self._seed(p, j),
                    return_logprob=return_logprob[i], logprob_start_len=start_len[i],
                    top_logprobs_num=top_num[i]))
        return reqs, single

    def _seed(self, params: SamplingParams, sample_index: int) -> int:
        if params.sampling_seed is not None:
            # n copies of one seeded prompt must still differ: mix the copy index in.
            return (params.sampling_seed + 0x9E3779B97F4A7C15 * sample_index) % (1 << 63)
        with self._rng_lock:
            return self._rng.getrandbits(63)

    def _output(self, req: Request, body: dict) -> dict:
        meta = {
            "id": req.rid,
            "finish_reason": req.finish_reason,
            "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "num_retractions": req.num_retractions,
            "reasoning_tokens": 0,
        }
        if req.return_logprob:
            with_text = bool(body.get("return_text_in_logprobs")) and self.tokenizer is not None
            meta["input_token_logprobs"] = self._logprob_entries(
                req.input_logprobs, req.input_ids[req.logprob_start_len:] if req.logprob_start_len >= 0 else [],
                with_text)
            meta["output_token_logprobs"] = self._logprob_entries(req.output_logprobs, req.output_ids, with_text)
            if req.top_logprobs_num > 0:
                meta["input_top_logprobs"] = [None if t is None else self._logprob_entries(*t, with_text)
                                              for t in req.input_top_logprobs]
                meta["output_top_logprobs"] = [self._logprob_entries(*t, with_text) for t in req.output_top_logprobs]
        meta["e2e_latency"] = req.e2e_latency
        out = {"output_ids": list(req.output_ids), "meta_info": meta}
        if self.tokenizer is not None:
            out = {"text": self._text(req), **out}
        return out

    def _logprob_entries(self, logprobs, token_ids, with_text: bool) -> list:
        with self.engine.tokenizer_lock:
            return [[lp, int(t), self.tokenizer.decode([t]) if with_text else None]
                    for lp, t in zip(logprobs, token_ids, strict=True)]

    def _text(self, req: Request) -> str:
        """Decoded output trimmed like SGLang's detokenizer (`trim_matched_stop`)."""
        ids = req.output_ids
        matched = (req.finish_reason or {}).get("matched")
        if isinstance(matched, int) and not req.params.no_stop_trim and ids:
            ids = ids[:-1]
        with self.engine.tokenizer_lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)
        if isinstance(matched, str):
            pos = text.find(matched)
            if pos != -1:
                text = text[:pos + len(matched)] if req.params.no_stop_trim else text[:pos]
        return text

    # ----------------------------------------------------------------- info / control
    def health(self, body: dict):
        return (HTTPStatus.OK if self.engine.alive else HTTPStatus.SERVICE_UNAVAILABLE), ""

    def health_generate(self, body: dict):
        if not self.engine.alive:
            return HTTPStatus.SERVICE_UNAVAILABLE, ""
        if self.engine.paused or self.engine.num_requests() > 0:
            return HTTPStatus.OK, ""  # busy means alive; SGLang also skips the probe then
        probe = Request(rid=f"HEALTH_CHECK_{time.time()}", input_ids=[0],
                        params=SamplingParams(max_new_tokens=1, temperature=0.0), seed=0)
        self.engine.submit([probe])
        ok = probe.done.wait(timeout=20) and probe.error is None
        return (HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE), ""

    def get_model_info(self, body: dict):
        return HTTPStatus.OK, {
            "model_path": self.args.model_path,
            "tokenizer_path": self.args.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
        }

    def get_server_info(self, body: dict):
        return HTTPStatus.OK, {
            **dataclasses.asdict(self.args),
            "weight_version": self.weight_version,
            "tp_size": 1, "dp_size": 1,
            "max_total_num_tokens": self.engine.context_length * self.args.max_running_requests,
            "internal_states": [{"num_requests": self.engine.num_requests(), "paused": self.engine.paused,
                                 "weight_update_groups": self.updater.group_names}],
            "version": SERVER_VERSION,
        }

    def get_weight_version(self, body: dict):
        return HTTPStatus.OK, {"weight_version": self.weight_version}

    def update_weight_version(self, body: dict):
        new_version = _field(body, "new_version", str)
        if _field(body, "abort_all_requests", bool, True):
            self.engine.abort(abort_all=True)
        self.weight_version = new_version
        log.info("Weight version updated to %s.", new_version)  # as a weight update that carries one logs it
        return HTTPStatus.OK, {"success": True, "message": f"Weight version updated to {new_version}",
                               "new_version": new_version}

    def _commit_staged(self) -> None:
        """Weights staged by flush_cache=false updates go live (with their version) at the latest here."""
        if self.updater.commit_staged() and self._staged_version is not None:
            self.weight_version, self._staged_version = self._staged_version, None

    def flush_cache(self, body: dict):
        # Nothing is cached across requests here; like SGLang, refuse while requests are in flight.
        self._commit_staged()
        ok = self.engine.num_requests() == 0
        text = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or "
                "waiting requests, the operation will not be performed.)\n")
        return (HTTPStatus.OK if ok else HTTPStatus.BAD_REQUEST), text

    def pause_generation(self, body: dict):
        mode = _field(body, "mode", str, "abort")
        if mode not in PAUSE_MODES:
            raise BadRequest(f"mode must be one of {list(PAUSE_MODES)}, got {mode!r}")
        count = self.engine.pause(mode)
        log.info("generation paused (mode=%s, %d requests affected)", mode, count)
        return HTTPStatus.OK, {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body: dict):
        self._commit_staged()
        self.engine.resume()
        log.info("generation continued")
        return HTTPStatus.OK, {"message": "Generation continued successfully.", "status": "ok"}

    def abort_request(self, body: dict):
        rid = _field(body, "rid", str, "") or ""
        count = self.engine.abort(rid=rid, abort_all=_field(body, "abort_all", bool, False))
        log.info("abort_request rid=%r abort_all=%s: %d aborted", rid, body.get("abort_all"), count)
        return HTTPStatus.OK, ""

    def _memory_tags(self, body: dict) -> list[str]:
        tags = _field(body, "tags", list, None)
        if tags is None:
            return list(MEMORY_TAGS)
        bad = [t for t in tags if t not in MEMORY_TAGS]
        if bad:
            raise BadRequest(f"tags must be a subset of {list(MEMORY_TAGS)}, got {bad}")
        return list(tags)

    def release_memory_occupation(self, body: dict):
        tags = self._memory_tags(body)
        try:
            self.engine.release_memory(tags)
        except ValueError as exc:
            return HTTPStatus.BAD_REQUEST, {"error": {"message": str(exc)}}
        log.info("memory released: %s", tags)
        return HTTPStatus.OK, None

    def resume_memory_occupation(self, body: dict):
        tags = self._memory_tags(body)
        self.engine.resume_memory(tags)
        log.info("memory resumed: %s", tags)
        return HTTPStatus.OK, None

    # ----------------------------------------------------------------- weights
    def init_weights_update_group(self, body: dict):
        ok, message = self.updater.init_group(
            master_address=_field(body, "master_address", str),
            master_port=_field(body, "master_port", int),
            rank_offset=_field(body, "rank_offset", int),
            world_size=_field(body, "world_size", int),
            group_name=_field(body, "group_name", str, "weight_update_group"),
            backend=_field(body, "backend", str, "nccl"))
        return _result(ok, message)

    def update_weights_from_distributed(self, body: dict):
        names, dtypes, shapes = _field(body, "names", list), _field(body, "dtypes", list), _field(body, "shapes", list)
        version = _field(body, "weight_version", str, None)
        if _field(body, "abort_all_requests", bool, False):
            self.engine.abort(abort_all=True, message="Aborted for a weight update")
        started = time.perf_counter()
        commit = _field(body, "flush_cache", bool, True)
        ok, message = self.updater.update_from_distributed(
            names, dtypes, shapes, group_name=_field(body, "group_name", str, "weight_update_group"),
            load_format=_field(body, "load_format", str, None), commit=commit)
        return self._after_update(ok, message, version, f"{len(names)} tensors from distributed", started, commit)

    def update_weights_from_disk(self, body: dict):
        model_path = _field(body, "model_path", str)
        version = _field(body, "weight_version", str, None)
        if _field(body, "abort_all_requests", bool, False):
            self.engine.abort(abort_all=True, message="Aborted for a weight update")
        started = time.perf_counter()
        ok, message = self.updater.update_from_disk(model_path, _field(body, "load_format", str, None))
        if ok:
            self.args.model_path = model_path
        status, content = self._after_update(ok, message, version, f"weights from {model_path}", started)
        return status, {**content, "num_paused_requests": 0}

    def update_weights_from_tensor(self, body: dict):
        entries = _field(body, "serialized_named_tensors", list)
        version = _field(body, "weight_version", str, None)
        if "weights" in self.engine.released:
            self.updater.drop_staged("the weights are released")
            return _result(False, "the weights are released by /release_memory_occupation; POST "
                                  "/resume_memory_occupation with tags [\"weights\"] before updating them")
        if _field(body, "abort_all_requests", bool, False):
            self.engine.abort(abort_all=True, message="Aborted for a weight update")
        started = time.perf_counter()
        commit = _field(body, "flush_cache", bool, True)
        ok, message = self.updater.update_from_tensor(entries, _field(body, "load_format", str, None), commit=commit)
        return self._after_update(ok, message, version, f"{len(entries)} serialized entries", started, commit)

    def destroy_weights_update_group(self, body: dict):
        self._staged_version = None
        return _result(*self.updater.destroy_group(_field(body, "group_name", str, "weight_update_group")))

    def _after_update(self, ok: bool, message: str, version: str | None, what: str, started: float,
                      commit: bool = True):
        if not ok:
            self._staged_version = None
        elif not commit:
            # the version goes live with the staged weights, never before them
            self._staged_version = version if version is not None else self._staged_version
        else:
            version = version if version is not None else self._staged_version
            self._staged_version = None
            if version is not None:
                self.weight_version = version
                message += f" Weight version updated to {version}."
        log.log(logging.INFO if ok else logging.ERROR, "weight update (%s) %s in %.3fs: %s",
                what, "succeeded" if ok else "FAILED", time.perf_counter() - started, message)
        return _result(ok, message)


def _result(ok: bool, message: str):
    return (HTTPStatus.OK if ok else HTTPStatus.BAD_REQUEST), {"success": ok, "message": message}


def _field(body: dict, name: str, kind: type, default=_MISSING):
    """One field of a control request, type-checked; missing required fields are a 400."""
    value = body.get(name, None)
    if value is None:
        if default is _MISSING:
            raise BadRequest(f"field required: {name!r}")
        return default
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"field {name!r} must be of type {kind.__name__}, got {value!r}")
    return value


class _Handler(BaseHTTPRequestHandler):
    server_version = SERVER_VERSION
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: a response is written as headers then body; with Nagle's algorithm on, the body
    # waits for the client's delayed ACK of the headers (40 ms on Linux) on every kept-alive call
    disable_nagle_algorithm = True
    rollout: RolloutServer  # set on the subclass made per server

    def log_message(self, fmt, *args):  # one info line per generate batch instead
        log.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    do_PUT = do_POST

    def _authorized(self, path: str) -> bool:
        """SGLang's rule (sglang.srt.utils.auth.decide_request_auth, 0.5.23) for its NORMAL and
        ADMIN_OPTIONAL endpoints with only api_key set: probes are open, the rest need the key."""
        key = self.rollout.args.api_key
        if key is None or path.startswith(("/health", "/ready", "/metrics")):
            return True
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), key.encode())

    def _dispatch(self):
        path = urlparse(self.path).path
        route = self.rollout.routes.get(path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self._authorized(path):
            return self._send(HTTPStatus.UNAUTHORIZED, {"error": "Unauthorized"})
        if route is None:
            return self._send(HTTPStatus.NOT_FOUND, {"detail": "Not Found"})
        try:
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
        except (json.JSONDecodeError, UnicodeDecodeError, BadRequest) as exc:
            return self._send(HTTPStatus.BAD_REQUEST, _validation_error(f"invalid JSON body: {exc}"))
        try:
            status, content = route(body)
        except BadRequest as exc:
            status, content = HTTPStatus.BAD_REQUEST, _validation_error(str(exc))
        except Exception as exc:  # noqa: BLE001 - report instead of dropping the connection
            log.exception("%s failed", path)
            status, content = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {"message": f"{type(exc).__name__}: {exc}"}}
        self._send(status, content)

    def _send_stream(self, status, chunks):
        self.close_connection = True  # the end of the body is the end of the connection
        try:
            self.send_response(int(status))
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for chunk in chunks:
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away during the %s stream", self.path)

    def _send(self, status, content):
        if hasattr(content, "__next__"):  # server-sent events, written as they are produced
            return self._send_stream(status, content)
        if isinstance(content, str):
            data, ctype = content.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(content).encode(), "application/json"
        try:
            self.send_response(int(status))
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away before the %s response was sent", self.path)


def _validation_error(message: str) -> dict:
    return {"object": "error", "message": message, "type": "Bad Request", "param": None, "code": 400}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_http_server(rollout: RolloutServer) -> ThreadingHTTPServer:
    handler = type("RolloutHandler", (_Handler,), {"rollout": rollout})
    http = _HTTPServer((rollout.args.host, rollout.args.port), handler)
    rollout.args.port = http.server_address[1]  # the real port when 0 was asked for
    return http


# --------------------------------------------------------------------- in-thread / child process
@dataclass
class ServerHandle:
    """A server running in a thread of this process."""

    url: str
    rollout: RolloutServer
    http: ThreadingHTTPServer
    thread: threading.Thread

    def shutdown(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.rollout.shutdown()


def start_server_in_thread(model_path: str, **kwargs) -> ServerHandle:
    """Load the model and serve it from a background thread; `port` defaults to a free one."""
    kwargs.setdefault("port", 0)
    rollout = RolloutServer(ServerArgs(model_path=model_path, **kwargs))
    http = make_http_server(rollout)
    host, port = http.server_address[:2]
    thread = threading.Thread(target=http.serve_forever, name=f"rollout-http-{port}", daemon=True)
    thread.start()
    return ServerHandle(url=f"http://{host}:{port}", rollout=rollout, http=http, thread=thread)


@dataclass
class ServerProcess:
    """An `erc-megatron serve` child process."""

    url: str
    process: subprocess.Popen
    log_path: str

    def terminate(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""


def launch_server_process(model_path: str, host: str = "127.0.0.1", port: int = 0, seed: int = 0,
                          extra_args: list[str] | tuple[str, ...] = (), startup_timeout: float = 300.0,
                          log_path: str | None = None, env: dict | None = None) -> ServerProcess:
    """Start `python -m erc_megatron.cli serve ...`, wait for /health, return its handle.

    With port 0 the child binds a free port and logs its URL, which is read back here (no race
    between picking a port and binding it). Output goes to `log_path` (a temp file by default),
    whose tail is included in the error if the server fails to come up.
    """
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="erc-serve-", suffix=".log")
        os.close(fd)
    cmd = [sys.executable, "-m", "erc_megatron.cli", "serve", "--model-path", model_path,
           "--host", host, "--port", str(port), "--seed", str(seed), *extra_args]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    handle = ServerProcess(url="", process=proc, log_path=log_path)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rollout server exited with code {proc.returncode} during start-up "
                               f"({' '.join(cmd)}); log tail:\n{handle.log_tail()}")
        if not handle.url:
            found = re.search(re.escape(_READY_LINE) + r"(\S+)", handle.log_tail(1 << 20))
            handle.url = found.group(1) if found else ""
        if handle.url:
            try:
                if requests.get(handle.url + "/health", timeout=5).status_code == 200:
                    return handle
            except requests.RequestException:
                pass
        time.sleep(0.1)
    handle.terminate()
    raise RuntimeError(f"rollout server did not become healthy within {startup_timeout:.0f}s "
                       f"({' '.join(cmd)}); log tail:\n{handle.log_tail()}")


# --------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = {name: f.default for name, f in ServerArgs.__dataclass_fields__.items()}
    parser.add_argument("--model-path", required=True,
                        help="Hugging Face model directory (config + safetensors, optionally a tokenizer)")
    parser.add_argument("--tokenizer-path", default=None, help="tokenizer directory (default: --model-path)")
    parser.add_argument("--host", default=d["host"], help="address to listen on")
    parser.add_argument("--port", type=int, default=d["port"], help="port to listen on; 0 picks a free one")
    parser.add_argument("--seed", type=int, default=d["seed"],
                        help="seeds requests that carry no sampling_params.sampling_seed")
    parser.add_argument("--max-running-requests", type=int, default=d["max_running_requests"],
                        help="most sequences decoded together")
    parser.add_argument("--weight-version", default=d["weight_version"], help="initial weight_version")
    parser.add_argument("--return-original-logprob", action="store_true",
                        default=os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true"),
                        help="report logprobs before temperature (as SGLANG_RETURN_ORIGINAL_LOGPROB=1 does)")
    parser.add_argument("--weight-update-timeout-s", type=float, default=d["weight_update_timeout_s"],
                        help="timeout of the weight-update process group (rendezvous and broadcasts)")
    parser.add_argument("--num-threads", type=int, default=d["num_threads"],
                        help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help="require `Authorization: Bearer KEY` (SGLang's flag; default: $" + API_KEY_ENV + ")")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server_args = ServerArgs(
        model_path=args.model_path, tokenizer_path=args.tokenizer_path, host=args.host, port=args.port,
        seed=args.seed, max_running_requests=args.max_running_requests, weight_version=args.weight_version,
        return_original_logprob=args.return_original_logprob,
        weight_update_timeout_s=args.weight_update_timeout_s, num_threads=args.num_threads, api_key=args.api_key)
    if server_args.api_key is None and server_args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-key: anyone who can reach it can replace the weights",
                    server_args.host)
    rollout = RolloutServer(server_args)
    http = make_http_server(rollout)
    host, port = http.server_address[:2]
    print(f"{_READY_LINE}http://{host}:{port}", flush=True)
    log.info("serving %s (weight_version=%s)", server_args.model_path, rollout.weight_version)
    try:
        http.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        http.server_close()
        rollout.shutdown()
    return 0
