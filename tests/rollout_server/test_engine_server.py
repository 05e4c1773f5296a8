"""The embedded server's /generate and control endpoints over real HTTP, against Hugging Face
references computed in float64 on the same tiny model."""
from __future__ import annotations

import threading
import time

import pytest
import requests
import torch

from erc_megatron.rollout_server.server import start_server_in_thread

from tests.rollout.tiny_model import EOS, EOS_PROBE_PROMPT, build_tiny_model, float64_copy, greedy_hf, reference_logits

PROMPTS = [[4, 5, 6], [7, 8, 9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33, 34]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def server(tiny):
    handle = start_server_in_thread(tiny.path, num_threads=1, max_running_requests=16, seed=1234)
    yield handle
    handle.shutdown()


@pytest.fixture(scope="module")
def model64(tiny):
    return float64_copy(tiny.model)


def post(server, body, endpoint="/generate", status=200):
    r = requests.post(server.url + endpoint, json=body, timeout=120)
    assert r.status_code == status, r.text
    return r.json() if r.headers.get("Content-Type", "").startswith("application/json") else r.text


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def test_greedy_batched_matches_hf_generate(server, tiny):
    out = post(server, {"input_ids": PROMPTS, "sampling_params": {"temperature": 0, "max_new_tokens": 10}})
    assert isinstance(out, list) and len(out) == len(PROMPTS)
    for prompt, res in zip(PROMPTS, out):
        ref = greedy_hf(tiny.model, prompt, 10)
        assert res["output_ids"] == ref
        meta = res["meta_info"]
        assert meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == len(ref)
        assert meta["cached_tokens"] == 0 and meta["weight_version"] == "default" and meta["e2e_latency"] > 0
        if ref[-1] in (EOS, tiny.extra_eos):
            assert meta["finish_reason"] == {"type": "stop", "matched": ref[-1]}
        else:
            assert meta["finish_reason"] == {"type": "length", "length": 10}
    # A single (unbatched) request returns a dict with the same tokens.
    single = post(server, {"input_ids": PROMPTS[1], "sampling_params": {"temperature": 0, "max_new_tokens": 10}})
    assert isinstance(single, dict) and single["output_ids"] == out[1]["output_ids"]


def test_sampled_logprobs_match_float64_reference(server, tiny, model64):
    params = {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_new_tokens": 12, "ignore_eos": True,
              "sampling_seed": 5}
    out = post(server, {"input_ids": PROMPTS, "sampling_params": params, "return_logprob": True,
                        "logprob_start_len": 0})
    for prompt, res in zip(PROMPTS, out):
        ids = res["output_ids"]
        entries = res["meta_info"]["output_token_logprobs"]
        assert [e[1] for e in entries] == ids and all(e[2] is None for e in entries)
        logits = reference_logits(model64, prompt + ids)
        for t, token in enumerate(ids):
            row = logits[len(prompt) + t - 1]
            # SGLang's convention: temperature-scaled, before top-k/top-p renormalisation.
            expected = torch.log_softmax(row / 0.7, -1)[token].item()
            assert abs(entries[t][0] - expected) < 2e-5, (t, entries[t][0], expected)
            # The token was drawn from the truncated distribution: inside top-k and the nucleus.
            probs = torch.softmax(row / 0.7, -1)
            rank = int((probs > probs[token]).sum())
            assert rank < 20
            assert probs[probs > probs[token]].sum().item() <= 0.9 + 1e-6
        # Prompt logprobs from position 0: None first, then the model's raw next-token logprobs
        # under the same temperature convention.
        prompt_entries = res["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in prompt_entries] == prompt and prompt_entries[0][0] is None
        for pos in range(1, len(prompt)):
            expected = torch.log_softmax(logits[pos - 1] / 0.7, -1)[prompt[pos]].item()
            assert abs(prompt_entries[pos][0] - expected) < 2e-5
    # Greedy requests report raw log_softmax (SGLang rewrites temperature 0 to 1 with top_k 1).
    greedy = post(server, {"input_ids": PROMPTS[0], "return_logprob": True, "top_logprobs_num": 3,
                           "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}})
    logits = reference_logits(model64, PROMPTS[0] + greedy["output_ids"])
    meta = greedy["meta_info"]
    assert len(meta["output_top_logprobs"]) == 4
    for t, (lp, token, _) in enumerate(meta["output_token_logprobs"]):
        row = torch.log_softmax(logits[len(PROMPTS[0]) + t - 1], -1)
        assert token == int(row.argmax()) and abs(lp - row[token].item()) < 2e-5
        top_values, top_ids = row.topk(3)
        assert [e[1] for e in meta["output_top_logprobs"][t]] == top_ids.tolist()
        assert max(abs(e[0] - v) for e, v in zip(meta["output_top_logprobs"][t], top_values.tolist())) < 2e-5


def test_n_samples_expand_sample_major(server):
    prompts = PROMPTS[:3]
    out = post(server, {"input_ids": prompts, "rid": "grp", "return_logprob": True,
                        "sampling_params": {"n": 4, "temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True,
                                            "sampling_seed": 11}})
    assert len(out) == 12
    for k, res in enumerate(out):
        j, i = divmod(k, len(prompts))  # result k is sample j of prompt i
        assert res["meta_info"]["prompt_tokens"] == len(prompts[i])
        assert res["meta_info"]["id"] == f"grp_{k}"
        assert len(res["output_ids"]) == 6 and len(res["meta_info"]["output_token_logprobs"]) == 6
    for i in range(len(prompts)):
        samples = {tuple(out[j * len(prompts) + i]["output_ids"]) for j in range(4)}
        assert len(samples) > 1, "the n samples of one prompt must not all coincide"
    # One prompt with n > 1 also comes back as a list.
    single = post(server, {"input_ids": prompts[0], "sampling_params": {"n": 3, "max_new_tokens": 2}})
    assert isinstance(single, list) and len(single) == 3


def test_finish_reasons_stop_strings_and_tokens(server, tiny):
    tok = tiny.tokenizer
    prompt = PROMPTS[0]
    base = post(server, {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 8,
                                                                   "ignore_eos": True}})
    ids = base["output_ids"]
    assert base["meta_info"]["finish_reason"] == {"type": "length", "length": 8} and len(ids) == 8
    assert base["text"] == tok.decode(ids, skip_special_tokens=True)
    eos = {EOS, tiny.extra_eos}
    # A regular word that first appears at index k, with no EOS before it.
    k = next(i for i in range(1, 8) if ids[i] not in ids[:i] and ids[i] >= 4 and not eos & set(ids[:i + 1]))

    # stop_token_ids: output keeps the matched token, text drops it.
    res = post(server, {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 8,
                                                                  "stop_token_ids": [ids[k]]}})
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[k]}
    assert res["output_ids"] == ids[:k + 1] and res["text"] == tok.decode(ids[:k], skip_special_tokens=True)
    res = post(server, {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 8,
                                                                  "stop_token_ids": [ids[k]], "ignore_eos": True}})
    assert res["meta_info"]["finish_reason"]["type"] == "length", "ignore_eos also ignores stop_token_ids"

    # Stop string: the decoded word of token k; text is cut before it, or after it with no_stop_trim.
    word = tok.decode([ids[k]])
    for no_trim in (False, True):
        res = post(server, {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 8,
                                                                      "ignore_eos": True, "stop": word,
                                                                      "no_stop_trim": no_trim}})
        assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": word}
        assert res["output_ids"] == ids[:k + 1]
        full = tok.decode(ids[:k + 1], skip_special_tokens=True)
        cut = full.find(word) + (len(word) if no_trim else 0)
        assert res["text"] == full[:cut]

    # max_new_tokens wins over EOS on the same step (SGLang checks length first).
    res = post(server, {"input_ids": EOS_PROBE_PROMPT,
                        "sampling_params": {"temperature": 0, "max_new_tokens": tiny.extra_eos_index + 1}})
    assert res["meta_info"]["finish_reason"] == {"type": "length", "length": tiny.extra_eos_index + 1}
    # EOS from generation_config (a list there): finish "stop" matched on the token id.
    res = post(server, {"input_ids": EOS_PROBE_PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 12}})
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": tiny.extra_eos}
    assert res["output_ids"] == greedy_hf(tiny.model, EOS_PROBE_PROMPT, 12)
    assert len(res["output_ids"]) == tiny.extra_eos_index + 1
    # max_new_tokens 0: nothing generated.
    res = post(server, {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 0}})
    assert res["output_ids"] == [] and res["meta_info"]["finish_reason"] == {"type": "length", "length": 0}


def test_seed_reproducible_and_top_k_one_is_greedy(server):
    body = {"input_ids": PROMPTS, "sampling_params": {"temperature": 1.3, "max_new_tokens": 10, "ignore_eos": True,
                                                      "sampling_seed": 77}}
    first, second = post(server, body), post(server, body)
    assert [r["output_ids"] for r in first] == [r["output_ids"] for r in second]
    # Batch-invariant: the same seeded prompt alone gives the same tokens.
    alone = post(server, {**body, "input_ids": PROMPTS[2]})
    assert alone["output_ids"] == first[2]["output_ids"]
    other = post(server, {**body, "sampling_params": {**body["sampling_params"], "sampling_seed": 78}})
    assert [r["output_ids"] for r in other] != [r["output_ids"] for r in first]
    greedy = post(server, {"input_ids": PROMPTS, "sampling_params": {"temperature": 0, "max_new_tokens": 10,
                                                                      "ignore_eos": True}})
    top1 = post(server, {"input_ids": PROMPTS, "sampling_params": {"temperature": 1.5, "top_k": 1,
                                                                    "max_new_tokens": 10, "ignore_eos": True}})
    assert [r["output_ids"] for r in top1] == [r["output_ids"] for r in greedy]


def test_text_input_and_text_in_logprobs(server, tiny):
    text = "aa ab ba bb"
    by_text = post(server, {"text": text, "return_logprob": True, "return_text_in_logprobs": True,
                            "sampling_params": {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}})
    by_ids = post(server, {"input_ids": tiny.tokenizer.encode(text),
                           "sampling_params": {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}})
    assert by_text["output_ids"] == by_ids["output_ids"]
    assert [e[2] for e in by_text["meta_info"]["output_token_logprobs"]] == \
        [tiny.tokenizer.decode([t]) for t in by_text["output_ids"]]


def test_concurrent_requests_share_forward_steps(server, tiny):
    engine = server.rollout.engine
    prompts = [[4 + i, 10 + i, 20 + i] for i in range(6)]
    results = [None] * len(prompts)

    def one(i):
        results[i] = post(server, {"input_ids": prompts[i],
                                   "sampling_params": {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}})

    steps = engine.steps
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for prompt, res in zip(prompts, results):
        ref = greedy_hf(tiny.model, prompt, 12)  # stops at EOS; ours ignores EOS
        assert len(res["output_ids"]) == 12 and res["output_ids"][:len(ref)] == ref
    # Served one after another this would take 6 * 12 = 72 steps.
    assert engine.steps - steps < 40, engine.steps - steps


_LONG = 3000  # decoding takes long enough that a pause always lands mid-request
_UNFINISHABLE = 4000  # near the tiny model's 4096-token context: seconds of decoding, even on an idle machine


def _long_request(server, results, key, rid=None, max_new_tokens=800):
    body = {"input_ids": PROMPTS[3], "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                                          "ignore_eos": True}}
    if rid:
        body["rid"] = rid
    thread = threading.Thread(target=lambda: results.__setitem__(key, post(server, body)))
    thread.start()
    wait_until(lambda: server.rollout.engine.num_requests() > 0)
    wait_until(lambda: any(len(r.output_ids) > 5 for r in server.rollout.engine._rows))
    return thread


def test_pause_modes_abort_and_flush(server):
    engine = server.rollout.engine
    results = {}
    reference = post(server, {"input_ids": PROMPTS[3], "sampling_params": {"temperature": 0, "max_new_tokens": _LONG,
                                                                           "ignore_eos": True}})
    # in_place: no step runs while paused; the request then finishes with the same tokens.
    thread = _long_request(server, results, "in_place", max_new_tokens=_LONG)
    post(server, {"mode": "in_place"}, "/pause_generation")
    steps = engine.steps
    assert post(server, {}, "/flush_cache", status=400)  # a request is still in flight
    time.sleep(0.2)
    assert engine.steps == steps
    assert post(server, {}, "/continue_generation") == {"message": "Generation continued successfully.",
                                                        "status": "ok"}
    thread.join(60)
    assert results["in_place"]["output_ids"] == reference["output_ids"]

    # retract: KV cache dropped, request re-prefilled with its partial output on continue.
    thread = _long_request(server, results, "retract", max_new_tokens=_LONG)
    post(server, {"mode": "retract"}, "/pause_generation")
    assert not engine._rows and engine.num_requests() == 1
    post(server, {}, "/continue_generation")
    thread.join(60)
    assert results["retract"]["output_ids"] == reference["output_ids"]
    assert results["retract"]["meta_info"]["finish_reason"] == {"type": "length", "length": _LONG}

    # Default mode aborts what is in flight; requests sent while paused wait for continue. The
    # request is made too long to finish before the pause lands, however fast the machine is.
    thread = _long_request(server, results, "abort", max_new_tokens=_UNFINISHABLE)
    assert post(server, {}, "/pause_generation")["status"] == "ok"
    thread.join(60)
    assert results["abort"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(results["abort"]["output_ids"]) < _UNFINISHABLE
    waiting = threading.Thread(target=lambda: results.__setitem__("late", post(
        server, {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}})))
    waiting.start()
    time.sleep(0.2)
    assert "late" not in results
    post(server, {}, "/continue_generation")
    waiting.join(60)
    assert len(results["late"]["output_ids"]) == 3

    # /abort_request matches rid prefixes, like SGLang's scheduler.
    thread = _long_request(server, results, "by_rid", rid="long-request-1", max_new_tokens=_UNFINISHABLE)
    post(server, {"rid": "long-request"}, "/abort_request")
    thread.join(60)
    assert results["by_rid"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert results["by_rid"]["meta_info"]["id"] == "long-request-1"
    wait_until(lambda: engine.num_requests() == 0)
    assert "Cache flushed" in post(server, {}, "/flush_cache")


@pytest.mark.parametrize("body, needle", [
    ({"input_ids": [4, 5], "text": "aa"}, "Either text, input_ids"),
    ({"input_ids": []}, "input_ids cannot be empty"),
    ({"input_ids": [4, 99]}, "input_ids must be in [0, 64)"),
    ({"input_ids": [4], "sampling_params": {"top_p": 0.0}}, "top_p must be in (0, 1]"),
    ({"input_ids": [4], "sampling_params": {"top_k": 0}}, "top_k must be -1"),
    ({"input_ids": [4], "sampling_params": {"temperature": -1}}, "temperature must be"),
    ({"input_ids": [4], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"input_ids": [4], "sampling_params": {"typo_field": 1}}, "typo_field"),
    ({"input_ids": [4], "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
    ({"input_ids": [4], "stream": True}, "stream"),
    ({"input_ids": [4], "return_logprobs": True}, "return_logprobs"),
    ({"input_ids": [[4], [5]], "rid": ["a"]}, "rids length mismatch"),
    ({"input_ids": [4] * 5000}, "longer than the model's context length"),
])
def test_bad_generate_requests_are_400_with_message(server, body, needle):
    out = post(server, body, status=400)
    assert needle in out["error"]["message"]


def test_info_endpoints(server, tiny):
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert requests.get(server.url + "/health_generate", timeout=30).status_code == 200
    info = requests.get(server.url + "/get_model_info", timeout=10).json()
    assert info["model_path"] == tiny.path and info["is_generation"] is True and info["weight_version"] == "default"
    assert requests.get(server.url + "/get_weight_version", timeout=10).json() == {"weight_version": "default"}
    server_info = requests.get(server.url + "/get_server_info", timeout=10).json()
    assert server_info["version"] and server_info["seed"] == 1234
    assert server.url.endswith(f":{server_info['port']}")
    assert requests.get(server.url + "/no_such_endpoint", timeout=10).status_code == 404
    bad = post(server, {"mode": "sideways"}, "/pause_generation", status=400)
    assert "mode must be one of" in bad["message"]
    missing = post(server, {"master_port": 1}, "/init_weights_update_group", status=400)
    assert "master_address" in missing["message"]


def test_engine_on_qwen2_matches_hf_generate():
    """The demo model is a Qwen2 (q/k/v biases): same cache surgery, same greedy tokens as HF."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from erc_megatron.rollout_server.engine import Engine, Request
    from erc_megatron.rollout_server.sampling import SamplingParams

    torch.manual_seed(3)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, initializer_range=0.5,
                                         max_position_embeddings=512)).eval()
    engine = Engine(model, eos_token_ids=[], max_running_requests=3)  # fewer slots than prompts: rows join late
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=9)
        reqs = [Request(rid=str(i), input_ids=p, params=params, seed=0) for i, p in enumerate(PROMPTS)]
        engine.generate(reqs)
    finally:
        engine.stop()
    for prompt, req in zip(PROMPTS, reqs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        assert req.output_ids == ref and req.finish_reason == {"type": "length", "length": 9}
