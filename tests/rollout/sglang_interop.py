"""Interop checks against SGLang's own code (run by test_sglang_interop.py in a process of its own,
because importing SGLang without a GPU puts stand-ins for triton/torchvision in place).

    python -m tests.rollout.sglang_interop MODEL_DIR

(a) every request our client sends (recorded at the HTTP layer while the client drives the
    embedded server through generation, pause/flush/continue, a weight-update group with a
    flattened-bucket broadcast, disk updates, aborts) is rebuilt with SGLang's own request class
    for that endpoint (`Cls(**payload)`: an unknown or renamed field is a TypeError) and
    validated with the pydantic schema SGLang's HTTP server parses bodies with;
(b) SGLang's front-end (`sglang.RuntimeEndpoint` + an `sgl.function` with `sgl.gen`) drives the
    embedded server, unmodified;
(c) every response field our client reads is compared with what SGLang itself builds:
    finish_reason with `FINISH_*(...).to_json()`, output_token_logprobs with
    `TokenizerManager.detokenize_logprob_tokens`, and the meta_info keys with the keys
    `TokenizerManager._handle_batch_output` writes (read from its source).
Prints one line per check; any failure raises.
"""
from __future__ import annotations

import re
import sys
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

ENDPOINT_CLASSES = {
    "/generate": "GenerateReqInput",
    "/pause_generation": "PauseGenerationReqInput",
    "/continue_generation": "ContinueGenerationReqInput",
    "/abort_request": "AbortReq",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
    "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/update_weight_version": "UpdateWeightVersionReqInput",
    "/release_memory_occupation": "ReleaseMemoryOccupationReqInput",
    "/resume_memory_occupation": "ResumeMemoryOccupationReqInput",
}
NO_BODY = {"/flush_cache", "/health", "/get_model_info", "/get_server_info", "/get_weight_version"}
# what erc_megatron reads from a /generate answer (client, collect, weight sync tests)
CLIENT_READS_META = ("id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version",
                     "output_token_logprobs")


def record_requests(client) -> list[tuple[str, dict | None]]:
    sent: list[tuple[str, dict | None]] = []
    real = client._session.request

    def request(method, url, json=None, **kw):
        sent.append((url.split("://", 1)[1].split("/", 1)[1].join(["/", ""]), json))
        return real(method, url, json=json, **kw)

    client._session.request = request
    return sent


def drive_client(url: str, model_dir: str, sent_log) -> dict:
    from erc_megatron.patches.custom_process_group import destroy_custom_process_group, init_custom_process_group
    from erc_megatron.rollout.client import SGLangClient
    from erc_megatron.rollout.flat_bucket import flatten_tensors
    from tests.distributed import free_port

    client = SGLangClient([url], timeout=120, max_retries=0)
    sent = record_requests(client)
    out = client.generate([[4, 5, 6], [7, 8]], {"max_new_tokens": 5, "temperature": 0.8, "top_p": 0.9, "n": 2,
                                                  "ignore_eos": True, "sampling_seed": 3}, return_logprob=True)
    out += client.generate([[9, 10]], [{"max_new_tokens": 3, "temperature": 0, "stop_token_ids": [2]}],
                           logprob_start_len=0, top_logprobs_num=2, return_logprob=True)
    client.pause_generation()
    client.pause_generation("retract")
    client.flush_cache()
    client.abort_request("nothing", abort_all=False)
    client.continue_generation()

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    port = free_port()
    joined = client.submit(client.init_weights_update_group, url, "127.0.0.1", port, 1, 2, "interop", "gloo")
    group = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, "interop", timedelta(seconds=60))
    joined.result(60)
    norm = torch.ones(32)
    done = client.submit(client.update_weights_from_distributed, url, ["model.norm.weight"], [torch.float32], [[32]],
                         "interop", "v1", "flattened_bucket", True)
    dist.broadcast(flatten_tensors([norm]), src=0, group=group)
    done.result(60)
    # the weight sync's commit: buckets staged with flush_cache=false, then the version alone
    done = client.submit(client.update_weights_from_distributed, url, ["model.norm.weight"], [torch.float32], [[32]],
                         "interop", None, "flattened_bucket", False)
    dist.broadcast(flatten_tensors([norm]), src=0, group=group)
    done.result(60)
    client.flush_cache()
    client.update_weight_version("v1b")
    assert client.get_weight_version() == {url: "v1b"}
    client.destroy_weights_update_group(url, "interop")
    destroy_custom_process_group(group)
    dist.destroy_process_group()

    client.update_weights_from_disk(model_dir, weight_version="v2")

    # colocated: our serialized_named_tensors entry is what SGLang's own deserializer reads
    from sglang.srt.utils.common import MultiprocessingSerializer

    from erc_megatron.rollout.tensor_payload import encode_named_tensors

    norm = torch.linspace(0.5, 1.5, 32)
    entry = encode_named_tensors([("model.norm.weight", norm.to(torch.bfloat16))])
    decoded = MultiprocessingSerializer.deserialize(entry)
    assert [n for n, _ in decoded] == ["model.norm.weight"], decoded
    assert decoded[0][1].dtype == torch.bfloat16 and torch.equal(decoded[0][1], norm.to(torch.bfloat16))
    client.update_weights_from_tensor(url, [entry], weight_version="v3")
    client.release_memory_occupation(["weights", "kv_cache"])
    client.resume_memory_occupation(None)
    client.close()
    sent_log.extend(sent)
    return {"generate": out}


def check_requests(sent, io_struct) -> None:
    import pydantic

    seen = set()
    for endpoint, payload in sent:
        if endpoint in NO_BODY:
            assert not payload, (endpoint, payload)
            continue
        assert endpoint in ENDPOINT_CLASSES, f"our client sent {endpoint}, which has no SGLang request class here"
        cls = getattr(io_struct, ENDPOINT_CLASSES[endpoint])
        try:
            cls(**payload)  # unknown / renamed fields: TypeError
        except TypeError as exc:
            raise AssertionError(f"{endpoint}: {ENDPOINT_CLASSES[endpoint]} refuses {sorted(payload)}: {exc}") from exc
        pydantic.TypeAdapter(cls).validate_python(payload)  # the schema SGLang's HTTP server parses with
        if endpoint == "/generate":
            from sglang.srt.sampling.sampling_params import SamplingParams

            obj = cls(**payload)
            obj.normalize_batch_and_arguments()
            params = payload["sampling_params"]
            for p in params if isinstance(params, list) else [params]:
                SamplingParams(**p).verify(64)  # unknown keys: TypeError; bad values: ValueError
        seen.add(endpoint)
    print(f"(a) {len(sent)} requests to {len(seen)} endpoints rebuilt with SGLang's own classes: {sorted(seen)}")
    return seen


def check_frontend(sgl, url: str) -> None:
    backend = sgl.RuntimeEndpoint(url)

    @sgl.function
    def continue_words(s, words):
        s += words
        s += sgl.gen("more", max_tokens=4, temperature=0)

    state = continue_words.run(words="aa ab ba", backend=backend)
    assert state.error() is None, f"SGLang's front-end failed on the embedded server: {state.error()!r}"
    more = state["more"]
    assert isinstance(more, str) and more, state.text()
    meta = state.get_meta_info("more")
    assert meta["completion_tokens"] >= 1 and meta["prompt_tokens"] >= 3, meta
    # the same request through our server directly gives the same continuation
    import requests

    ref = requests.post(url + "/generate", json={"text": "aa ab ba", "sampling_params": {
        "max_new_tokens": 4, "temperature": 0}}, timeout=60).json()
    assert ref["text"] == more, (ref["text"], more)
    print(f"(b) sgl.RuntimeEndpoint + sgl.function/sgl.gen: {more!r}, meta_info keys {sorted(meta)}")


def _tokenizer_manager_method(name: str):
    """(source, function) of one TokenizerManager method, read from SGLang's file without importing
    the module (it imports the whole serving stack: fastapi, opentelemetry, ...)."""
    import ast
    import importlib.util
    import typing

    path = importlib.util.find_spec("sglang.srt.managers.tokenizer_manager").origin
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TokenizerManager")
    fn = next((n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None)
    assert fn is not None, f"SGLang's TokenizerManager has no {name} any more"
    source = ast.get_source_segment(open(path).read(), fn)
    namespace = {k: getattr(typing, k) for k in ("List", "Optional", "Dict", "Tuple", "Union", "Any")}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), namespace)  # noqa: S102 - SGLang's code
    return source, namespace[name]


def sglang_meta_keys() -> set[str]:
    """The meta_info keys SGLang's TokenizerManager always writes for a finished generate request."""
    src, _ = _tokenizer_manager_method("_handle_batch_output")
    keys = set(re.findall(r'meta_info = \{([^}]*)\}', src)[0].split(",")) if "meta_info = {" in src else set()
    keys = {k.split(":")[0].strip().strip('"') for k in keys if ":" in k}
    update = re.search(r'meta_info\.update\(\s*\{([^}]*)\}', src)
    assert update, "TokenizerManager._handle_batch_output changed shape"
    keys |= {k.split(":")[0].strip().strip('"') for k in update.group(1).split(",") if ":" in k}
    keys.discard("")
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version"} <= keys, keys
    return keys


def check_responses(outputs: list[dict], tokenizer, url: str) -> None:
    import requests
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH, FINISH_MATCHED_STR, FINISH_MATCHED_TOKEN

    _, detokenize_logprob_tokens = _tokenizer_manager_method("detokenize_logprob_tokens")

    keys = sglang_meta_keys()
    extra = {"e2e_latency"}  # written when the request finishes (TokenizerManager, same file)
    for res in outputs:
        meta = res["meta_info"]
        missing = (keys | extra) - set(meta)
        assert not missing, f"meta_info lacks SGLang's keys {sorted(missing)}"
        for k in CLIENT_READS_META:
            assert k in meta, k
        assert isinstance(meta["id"], str) and isinstance(meta["weight_version"], str)
        for k in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            assert isinstance(meta[k], int) and not isinstance(meta[k], bool), (k, meta[k])
        fr = meta["finish_reason"]
        sglang_fr = (FINISH_LENGTH(length=fr["length"]) if fr["type"] == "length" else
                     FINISH_MATCHED_TOKEN(matched=fr["matched"]) if isinstance(fr.get("matched"), int) else
                     FINISH_MATCHED_STR(matched=fr["matched"])).to_json()
        assert fr == sglang_fr, (fr, sglang_fr)
        vals = [e[0] for e in meta["output_token_logprobs"]]
        ids = [e[1] for e in meta["output_token_logprobs"]]
        assert ids == res["output_ids"]
        this = SimpleNamespace(tokenizer=tokenizer)
        expected = detokenize_logprob_tokens(this, vals, ids, False)
        assert meta["output_token_logprobs"] == [list(e) for e in expected]
    # with return_text_in_logprobs: [logprob, token_id, text] as SGLang's tokenizer manager decodes it
    res = requests.post(url + "/generate", timeout=60, json={
        "input_ids": [4, 5, 6], "return_logprob": True, "return_text_in_logprobs": True,
        "sampling_params": {"max_new_tokens": 4, "temperature": 0, "stop": ["zz"]}}).json()
    entries = res["meta_info"]["output_token_logprobs"]
    expected = detokenize_logprob_tokens(SimpleNamespace(tokenizer=tokenizer), [e[0] for e in entries],
                                                          [e[1] for e in entries], True)
    assert entries == [list(e) for e in expected], (entries, expected)
    stop = requests.post(url + "/generate", timeout=60, json={
        "input_ids": [4, 5, 6], "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True,
                                                    "stop": [tokenizer.decode(res["output_ids"][1:2])]}}).json()
    assert stop["meta_info"]["finish_reason"] == FINISH_MATCHED_STR(
        matched=tokenizer.decode(res["output_ids"][1:2])).to_json()
    print(f"(c) meta_info has every key SGLang writes ({sorted(keys)}); finish_reason and output_token_logprobs "
          f"equal SGLang's own FINISH_*.to_json() / detokenize_logprob_tokens on {len(outputs) + 2} results")


def main(model_dir: str) -> None:
    from erc_megatron.patches.sglang_cpu_import import import_sglang
    from transformers import AutoTokenizer

    from erc_megatron.rollout_server.server import launch_server_process

    sgl = import_sglang()
    from sglang.srt.managers import io_struct

    # a process of its own: both ends of the weight-update group cannot live in one process
    server = launch_server_process(model_dir, extra_args=["--num-threads", "1", "--weight-update-timeout-s", "60"])
    try:
        sent: list = []
        outputs = drive_client(server.url, model_dir, sent)["generate"]
        check_requests(sent, io_struct)
        check_frontend(sgl, server.url)
        check_responses(outputs, AutoTokenizer.from_pretrained(model_dir), server.url)
    finally:
        server.terminate()
    print("sglang interop: OK")


if __name__ == "__main__":
    main(sys.argv[1])
