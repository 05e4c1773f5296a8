"""OpenAI-compatible `/v1/models`, `/v1/completions` and `/v1/chat/completions` of the embedded server.

Shapes follow SGLang's OpenAI adapter (`sglang.srt.entrypoints.openai`, 0.5.x), which follows
OpenAI's API: completions logprobs in the legacy form (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`), chat logprobs as `content: [{token, logprob, bytes,
top_logprobs}]`, `finish_reason` "stop" / "length" plus SGLang's `matched_stop`, `usage` with
prompt / completion / total tokens. `stream: true` answers server-sent events
(`data: {chunk}` lines, then `data: [DONE]`) with the text decoded so far, as tokens come out of
the engine. Requests go through the same engine as `/generate`, with its sampling conventions.
"""
from __future__ import annotations

import json
import time
import uuid
from http import HTTPStatus

from .sampling import SamplingParamsError

_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "logprobs",
                      "echo", "stream", "stream_options", "seed", "user", "stop_token_ids", "ignore_eos",
                      "skip_special_tokens", "no_stop_trim", "frequency_penalty", "presence_penalty", "min_p",
                      "repetition_penalty", "logit_bias", "best_of", "suffix", "rid"}
_CHAT_FIELDS = (_COMPLETION_FIELDS - {"prompt", "echo", "logprobs", "best_of", "suffix"}) | {
    "messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools", "tool_choice", "response_format"}


def _error(message: str, status=HTTPStatus.BAD_REQUEST):
    return status, {"object": "error", "message": message, "type": "BadRequestError", "param": None,
                    "code": int(status)}


def models(server, body: dict):
    return HTTPStatus.OK, {"object": "list", "data": [{
        "id": server.args.model_path, "object": "model", "created": int(time.time()), "owned_by": "sglang",
        "root": server.args.model_path, "max_model_len": server.engine.context_length}]}


def _sampling(body: dict, max_tokens_default: int | None) -> dict:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params = {"max_new_tokens": max_tokens if max_tokens is not None else max_tokens_default,
              "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
              "top_k": body.get("top_k", -1), "n": body.get("n", 1), "stop": body.get("stop"),
              "stop_token_ids": body.get("stop_token_ids"), "ignore_eos": body.get("ignore_eos", False),
              "skip_special_tokens": body.get("skip_special_tokens", True),
              "no_stop_trim": body.get("no_stop_trim", False), "sampling_seed": body.get("seed")}
    for key, _default in (("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("min_p", 0.0),
                          ("repetition_penalty", 1.0), ("logit_bias", None)):
        if body.get(key) is not None:
            params[key] = body[key]  # refused by SamplingParams unless at the default
    return {k: v for k, v in params.items() if v is not None}


def _finish(req) -> tuple[str, object]:
    reason = req.finish_reason or {}
    return ("length" if reason.get("type") == "length" else "abort" if reason.get("type") == "abort" else "stop",
            reason.get("matched"))


def _run(server, body: dict, prompts: list[list[int]], top: int, want_logprobs: bool, max_default):
    native = {"input_ids": prompts, "sampling_params": _sampling(body, max_default),
              "return_logprob": want_logprobs, "top_logprobs_num": top}
    reqs, _ = server._parse_generate(native)
    server.engine.submit(reqs)
    return reqs


def _decode(server, ids: list[int]) -> str:
    with server.engine.tokenizer_lock:
        return server.tokenizer.decode(ids)


def _token_texts(server, ids: list[int]) -> list[str]:
    with server.engine.tokenizer_lock:
        return [server.tokenizer.decode([t]) for t in ids]


def _usage(reqs) -> dict:
    prompt = sum(len(r.input_ids) for r in reqs[: max(1, len(reqs) // max(1, reqs[0].params.n))])
    completion = sum(len(r.output_ids) for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stream(server, reqs, chunk_of, final_of):
    """Server-sent events: one chunk per request whenever its decoded text grew, then [DONE]."""
    sent = [""] * len(reqs)
    while True:
        done = all(r.done.is_set() for r in reqs)
        for i, req in enumerate(reqs):
            text = server._text(req) if req.done.is_set() else _decode(server, list(req.output_ids))
            if len(text) > len(sent[i]) and text.startswith(sent[i]):
                yield f"data: {json.dumps(chunk_of(i, text[len(sent[i]):], None))}\n\n".encode()
                sent[i] = text
        if done:
            break
        reqs[0].done.wait(0.01)
    for i, req in enumerate(reqs):
        yield f"data: {json.dumps(chunk_of(i, '', req))}\n\n".encode()
    yield f"data: {json.dumps(final_of())}\n\n".encode() if final_of else b""
    yield b"data: [DONE]\n\n"


def _check_fields(body: dict, allowed: set[str], what: str):
    unknown = sorted(set(body) - allowed)
    if unknown:
        return _error(f"unknown {what} field(s) {unknown}")
    if body.get("echo"):
        return _error("echo=true is not supported by the embedded rollout server")
    return None


def _respond(server, body: dict, reqs, head: dict, full_object: str, chunk_object: str, chunk_choice, full_choice):
    """The OpenAI envelope shared by completions and chat: server-sent chunks when `stream`, else one
    answer once every request is done. `chunk_choice(delta, finished_req_or_None)` and
    `full_choice(req)` give the endpoint's own part of a choice."""
    if body.get("stream"):
        def chunk_of(i, delta, finished):
            reason, matched = _finish(finished) if finished is not None else (None, None)
            return {**head, "object": chunk_object,
                    "choices": [{"index": i, **chunk_choice(delta, finished),
                                 "finish_reason": reason, "matched_stop": matched}]}
        usage = body.get("stream_options") or {}
        final = (lambda: {**head, "object": chunk_object, "choices": [], "usage": _usage(reqs)}) \
            if usage.get("include_usage") else None
        return HTTPStatus.OK, _stream(server, reqs, chunk_of, final)
    for req in reqs:
        req.done.wait()
    choices = []
    for i, req in enumerate(reqs):
        reason, matched = _finish(req)
        choices.append({"index": i, **full_choice(req), "finish_reason": reason, "matched_stop": matched})
    return HTTPStatus.OK, {**head, "object": full_object, "choices": choices, "usage": _usage(reqs)}


def completions(server, body: dict):
    refused = _check_fields(body, _COMPLETION_FIELDS, "/v1/completions")
    if refused:
        return refused
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = prompt
    else:
        return _error("prompt must be a string, a list of strings, a list of token ids or a list of such lists")
    if server.tokenizer is None and any(isinstance(p, str) for p in prompts):
        return _error("text prompts need a tokenizer, and this server has none")
    with server.engine.tokenizer_lock:
        ids = [server.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    top = body.get("logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 0):
        return _error(f"logprobs must be a non-negative integer, got {top!r}")
    try:
        reqs = _run(server, body, ids, top or 0, top is not None, 16)
    except (SamplingParamsError, ValueError, TypeError) as exc:
        return _error(str(exc))
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.get("model") or server.args.model_path

    def choice_logprobs(req):
        if top is None:
            return None
        tokens = _token_texts(server, req.output_ids)
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        tops = None
        if top:
            tops = [{_token_texts(server, [i])[0]: lp for lp, i in zip(*entry)} for entry in req.output_top_logprobs]
        return {"tokens": tokens, "token_logprobs": list(req.output_logprobs), "top_logprobs": tops,
                "text_offset": offsets}

    def chunk_choice(delta, finished):
        return {"text": delta, "logprobs": choice_logprobs(finished) if finished else None}

    def full_choice(req):
        return {"text": server._text(req), "logprobs": choice_logprobs(req)}

    return _respond(server, body, reqs, {"id": rid, "created": created, "model": model},
                    "text_completion", "text_completion", chunk_choice, full_choice)


def chat_completions(server, body: dict):
    refused = _check_fields(body, _CHAT_FIELDS, "/v1/chat/completions")
    if refused:
        return refused
    if body.get("tools"):
        return _error("tools are not supported by the embedded rollout server")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        return _error("messages must be a non-empty list of {role, content} objects")
    if server.tokenizer is None or not getattr(server.tokenizer, "chat_template", None):
        return _error("chat completions need a tokenizer with a chat template, and this server's has none")
    with server.engine.tokenizer_lock:
        ids = server.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = [int(t) for t in ids]
    want = bool(body.get("logprobs"))
    top = body.get("top_logprobs") or 0
    if not isinstance(top, int) or isinstance(top, bool) or top < 0 or (top and not want):
        return _error("top_logprobs must be a non-negative integer and needs logprobs=true")
    try:
        reqs = _run(server, body, [ids], top, want, None)
    except (SamplingParamsError, ValueError, TypeError) as exc:
        return _error(str(exc))
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.get("model") or server.args.model_path

    def entry(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}

    def choice_logprobs(req):
        if not want:
            return None
        content = []
        for k, (token, lp) in enumerate(zip(_token_texts(server, req.output_ids), req.output_logprobs)):
            tops = []
            if top:
                values, top_ids = req.output_top_logprobs[k]
                tops = [entry(t, v) for t, v in zip(_token_texts(server, top_ids), values)]
            content.append({**entry(token, lp), "top_logprobs": tops})
        return {"content": content}

    def chunk_choice(delta, finished):
        d = {"content": delta} if finished is None else {}
        return {"delta": {"role": "assistant", **d}, "logprobs": choice_logprobs(finished) if finished else None}

    def full_choice(req):
        return {"message": {"role": "assistant", "content": server._text(req)}, "logprobs": choice_logprobs(req)}

    return _respond(server, body, reqs, {"id": rid, "created": created, "model": model},
                    "chat.completion", "chat.completion.chunk", chunk_choice, full_choice)
