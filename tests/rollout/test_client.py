"""SGLangClient against real embedded servers: failures, retries, multi-server order."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from erc_megatron.rollout.client import SGLangClient, SGLangError, group_by_prompt
from erc_megatron.rollout_server.server import launch_server_process, start_server_in_thread
from tests.distributed import free_port

from .tiny_model import build_tiny_model

PROMPTS = [[4, 5], [6, 7, 8], [9, 10, 11, 12], [13], [14, 15, 16, 17, 18], [19, 20, 21, 22, 23, 24], [25, 26, 27]]
SEEDED = {"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True, "sampling_seed": 3, "n": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_client")), seed=2)


@pytest.fixture(scope="module")
def servers(tiny):
    handles = [start_server_in_thread(tiny.path, num_threads=1) for _ in range(2)]
    yield handles
    for h in handles:
        h.shutdown()


def test_unreachable_server_names_url_and_endpoint(servers):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = SGLangClient([url], max_retries=2, backoff=0.01, connect_timeout=2)
    start = time.monotonic()
    with pytest.raises(SGLangError) as info:
        client.generate([[4, 5]], {"max_new_tokens": 2})
    message = str(info.value)
    assert url + "/generate" in message and "after 3 attempts" in message and "ConnectionError" in message
    assert time.monotonic() - start < 30
    with pytest.raises(SGLangError, match="not healthy within"):
        client.wait_healthy(timeout=0.5, interval=0.1)


def test_4xx_is_not_retried_and_carries_the_server_message(servers):
    rollout = servers[0].rollout
    client = SGLangClient([servers[0].url], max_retries=3, backoff=0.01)
    calls = rollout.generate_calls
    with pytest.raises(SGLangError) as info:
        client.generate([[4, 5]], {"max_new_tokens": 2, "top_p": 1.5})
    assert info.value.status == 400 and "top_p must be in (0, 1]" in str(info.value)
    assert servers[0].url + "/generate" in str(info.value)
    assert rollout.generate_calls == calls + 1


def test_multi_server_split_preserves_sglang_order(servers):
    both = SGLangClient([h.url for h in servers])
    one = SGLangClient([servers[0].url])
    calls = [h.rollout.generate_calls for h in servers]
    split = both.generate(PROMPTS, SEEDED, return_logprob=True)
    assert [h.rollout.generate_calls - c for h, c in zip(servers, calls)] == [1, 1]  # both servers used
    whole = one.generate(PROMPTS, SEEDED, return_logprob=True)
    assert len(split) == len(PROMPTS) * 2
    assert [r["output_ids"] for r in split] == [r["output_ids"] for r in whole]
    for k, res in enumerate(split):  # sample-major over the whole batch
        assert res["meta_info"]["prompt_tokens"] == len(PROMPTS[k % len(PROMPTS)])
        assert len(res["meta_info"]["output_token_logprobs"]) == 6
    grouped = group_by_prompt(split, len(PROMPTS))
    assert [[r["meta_info"]["prompt_tokens"] for r in g] for g in grouped] == [[len(p)] * 2 for p in PROMPTS]
    # One sampling_params dict per prompt (here: its own seed) is split along with the prompts.
    per_prompt = [{**SEEDED, "n": 1, "sampling_seed": 100 + i} for i in range(len(PROMPTS))]
    split = both.generate(PROMPTS, per_prompt)
    assert [r["output_ids"] for r in split] == [r["output_ids"] for r in one.generate(PROMPTS, per_prompt)]
    assert split[0]["output_ids"] == one.generate([PROMPTS[0]], [per_prompt[0]])[0]["output_ids"]
    assert split[0]["output_ids"] != one.generate([PROMPTS[0]], [per_prompt[1]])[0]["output_ids"]
    # Control calls fan out to every server.
    both.wait_healthy(timeout=10)
    assert set(both.get_weight_version().values()) == {"default"}
    assert all(r["status"] == "ok" for r in both.pause_generation(mode="in_place").values())
    both.continue_generation()
    both.flush_cache(timeout=10)


def test_server_dying_mid_rollout_raises_instead_of_hanging(tiny):
    server = launch_server_process(tiny.path, extra_args=["--num-threads", "1"])
    client = SGLangClient([server.url], max_retries=2, backoff=0.05, connect_timeout=2)
    outcome = {}

    def rollout():
        try:
            outcome["result"] = client.generate([[4, 5, 6]] * 8, {"max_new_tokens": 3000, "ignore_eos": True})
        except SGLangError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=rollout)
    try:
        thread.start()
        deadline = time.monotonic() + 60
        while True:  # kill only once the server is generating
            info = requests.get(server.url + "/get_server_info", timeout=10).json()
            if info["internal_states"][0]["num_requests"] > 0:
                break
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.05)
        server.kill()
        killed = time.monotonic()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the client hung after the server died"
        assert time.monotonic() - killed < 30
    finally:
        server.kill()
    assert "error" in outcome, outcome
    assert server.url + "/generate" in str(outcome["error"]) and "after 3 attempts" in str(outcome["error"])


def test_api_key_is_sglangs_bearer_header(tiny):
    handle = start_server_in_thread(tiny.path, num_threads=1, api_key="s3cret")
    try:
        assert handle.url.startswith("http://127.0.0.1:")  # loopback unless asked otherwise
        assert requests.get(handle.url + "/health", timeout=10).status_code == 200  # probes stay open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = requests.post(handle.url + "/generate", json={"input_ids": [4, 5]}, headers=headers, timeout=10)
            assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}, (headers, r.text)
        r = requests.get(handle.url + "/get_model_info", headers={"Authorization": "bearer s3cret"}, timeout=10)
        assert r.status_code == 200
        with pytest.raises(SGLangError, match="Unauthorized"):
            SGLangClient([handle.url], max_retries=0).get_weight_version()
        client = SGLangClient([handle.url], max_retries=0, api_key="s3cret")
        out = client.generate([[4, 5]], {"max_new_tokens": 2, "ignore_eos": True})
        assert len(out[0]["output_ids"]) == 2
        client.close()
    finally:
        handle.shutdown()


def test_dead_server_leaves_rotation_and_load_decides_the_split(tiny, servers, caplog):
    spare = start_server_in_thread(tiny.path, num_threads=1)
    urls = [servers[0].url, spare.url]
    client = SGLangClient(urls, max_retries=0, connect_timeout=2)
    whole = SGLangClient([servers[0].url]).generate(PROMPTS, SEEDED)
    # load: a server with prompts in flight gets a smaller share
    client._in_flight[spare.url] = 3
    assert [hi - lo for _, lo, hi in client._split(len(PROMPTS))] == [6, 1]
    client._in_flight[spare.url] = 0
    spare.shutdown()  # nothing listens there any more
    with caplog.at_level("WARNING"):
        out = client.generate(PROMPTS, SEEDED)
    assert [r["output_ids"] for r in out] == [r["output_ids"] for r in whole]  # same order, same samples
    assert client.live_urls == [servers[0].url] and spare.url in client.dead
    assert any("taken out of rotation" in r.message and spare.url in r.message for r in caplog.records)
    assert list(client.get_weight_version()) == [servers[0].url]  # control calls skip it too
    calls = servers[0].rollout.generate_calls
    client.generate(PROMPTS[:2], SEEDED)
    assert servers[0].rollout.generate_calls == calls + 1
    client.close()
