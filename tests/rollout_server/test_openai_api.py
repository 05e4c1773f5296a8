"""The embedded server's OpenAI-compatible endpoints, driven by the `openai` Python client and
compared with the native /generate answers of the same engine (same seeds, same tokens)."""
from __future__ import annotations

import pytest
import requests

from erc_megatron.rollout_server.server import start_server_in_thread

from tests.rollout.tiny_model import build_tiny_model

openai = pytest.importorskip("openai", reason="pip install openai (in the dev extra)")

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # words of the tiny vocabulary
KEY = "k3y"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tiny = build_tiny_model(str(tmp_path_factory.mktemp("tiny_openai")), seed=3)
    tiny.tokenizer.chat_template = TEMPLATE
    tiny.tokenizer.save_pretrained(tiny.path)
    handle = start_server_in_thread(tiny.path, num_threads=1, api_key=KEY)
    client = openai.OpenAI(base_url=handle.url + "/v1", api_key=KEY, max_retries=0)
    yield handle, client, tiny
    client.close()
    handle.shutdown()


def native(handle, body):
    r = requests.post(handle.url + "/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_and_completions(served):
    handle, client, tiny = served
    assert [m.id for m in client.models.list().data] == [tiny.path]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=handle.url + "/v1", api_key="wrong", max_retries=0).models.list()

    out = client.completions.create(model=tiny.path, prompt="aa ab ba", max_tokens=5, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    ref = native(handle, {"text": "aa ab ba", "return_logprob": True, "top_logprobs_num": 2,
                          "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}})
    choice = out.choices[0]
    assert choice.text == ref["text"] and choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == [e[0] for e in ref["meta_info"]["output_token_logprobs"]]
    assert choice.logprobs.tokens == [tiny.tokenizer.decode([e[1]]) for e in ref["meta_info"]["output_token_logprobs"]]
    assert [len(t) for t in choice.logprobs.top_logprobs] == [2] * 5
    top0 = ref["meta_info"]["output_top_logprobs"][0]
    assert choice.logprobs.top_logprobs[0] == {tiny.tokenizer.decode([e[1]]): e[0] for e in top0}
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (3, 5, 8)

    # n samples with a seed, token-id prompts, a stop token
    out = client.completions.create(model=tiny.path, prompt=[[4, 5, 6], [7, 8]], max_tokens=4, n=2, seed=9,
                                    temperature=1.0)
    ref = native(handle, {"input_ids": [[4, 5, 6], [7, 8]],
                          "sampling_params": {"max_new_tokens": 4, "n": 2, "sampling_seed": 9, "temperature": 1.0}})
    assert [c.text for c in out.choices] == [r["text"] for r in ref]

    # stream: the deltas add up to the same text, the last chunk carries the finish reason
    chunks = list(client.completions.create(model=tiny.path, prompt="aa ab ba", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(model=tiny.path, prompt="aa ab ba", max_tokens=6, temperature=0)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.completions.create(model=tiny.path, prompt="aa", frequency_penalty=0.5)


def test_chat_completions(served):
    handle, client, tiny = served
    messages = [{"role": "user", "content": "ab ba"}, {"role": "assistant", "content": "cc"},
                {"role": "user", "content": "dd"}]
    ids = tiny.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    out = client.chat.completions.create(model=tiny.path, messages=messages, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    ref = native(handle, {"input_ids": list(ids), "return_logprob": True, "top_logprobs_num": 3,
                          "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}})
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref["text"]
    assert [c.logprob for c in choice.logprobs.content] == [e[0] for e in ref["meta_info"]["output_token_logprobs"]]
    assert [c.token for c in choice.logprobs.content] == [tiny.tokenizer.decode([e[1]])
                                                          for e in ref["meta_info"]["output_token_logprobs"]]
    assert all(len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode()) for c in choice.logprobs.content)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 4

    chunks = list(client.chat.completions.create(model=tiny.path, messages=messages, max_tokens=4, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref["text"]
    assert chunks[-1].choices[0].finish_reason == "length"
