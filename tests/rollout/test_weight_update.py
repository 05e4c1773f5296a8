"""Learner -> rollout weight sync over SGLang's real protocol: this test process is the learner
(group rank 0, with its own default group as a trainer would have), the embedded server runs in
a child process as rank 1; weights are checked by comparing the server's logprobs with a float64
Hugging Face model holding the new weights."""
from __future__ import annotations

from datetime import timedelta

import pytest
import requests
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from erc_megatron.patches.custom_process_group import destroy_custom_process_group, init_custom_process_group
from erc_megatron.rollout.client import SGLangClient, SGLangError
from erc_megatron.rollout.flat_bucket import flatten_tensors
from erc_megatron.rollout_server.server import launch_server_process
from tests.distributed import free_port

from .tiny_model import build_tiny_model, make_config, reference_logits

PROBE = [4, 5, 6, 7, 8]
GROUP = "weight_update_group"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_wu")), seed=1)


@pytest.fixture(scope="module")
def server(tiny):
    proc = launch_server_process(tiny.path, extra_args=["--num-threads", "1", "--weight-update-timeout-s", "60",
                                                        "--log-level", "info"])
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def client(server):
    c = SGLangClient([server.url], timeout=120, max_retries=1, backoff=0.05)
    yield c
    c.close()


@pytest.fixture(scope="module")
def learner_group(server, client):
    """The learner's side: a default group (as in training) plus the weight-update group."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    port = free_port()
    joined = client.submit(client.init_weights_update_group, server.url, "127.0.0.1", port, 1, 2, GROUP, "gloo")
    group = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, GROUP, timeout=timedelta(seconds=60))
    assert joined.result(timeout=60)["success"] is True
    yield group
    assert client.destroy_weights_update_group(server.url, GROUP)["success"] is True
    destroy_custom_process_group(group)
    dist.destroy_process_group()


def new_weights(tiny, seed: int) -> dict[str, torch.Tensor]:
    """Fresh values for every tensor of the checkpoint (lm_head is tied to the embedding)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tiny.model.state_dict().items():
        if name == "lm_head.weight":
            continue
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        out[name] = 1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.5 * noise
    return out


def reference_model(weights: dict[str, torch.Tensor]):
    model = LlamaForCausalLM(make_config()).double().eval()
    missing, unexpected = model.load_state_dict({k: v.double() for k, v in weights.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def probe(server) -> dict:
    r = requests.post(server.url + "/generate", timeout=60, json={
        "input_ids": PROBE, "return_logprob": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    return r.json()


def assert_probe_matches(server, weights):
    out = probe(server)
    logits = reference_logits(reference_model(weights), PROBE + out["output_ids"])
    for t, (lp, token, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
        row = torch.log_softmax(logits[len(PROBE) + t - 1], -1)
        assert abs(lp - row[token].item()) < 5e-5, (t, lp, row[token].item())
        assert row[token].item() >= row.max().item() - 1e-5  # greedy under the new weights
    return out


def broadcast_update(client, server, group, weights, dtypes, version, flat=False):
    names = list(weights)
    tensors = [weights[n].to(dtypes[n]) for n in names]
    done = client.submit(client.update_weights_from_distributed, server.url, names, [t.dtype for t in tensors],
                         [list(t.shape) for t in tensors], GROUP, version, "flattened_bucket" if flat else None)
    if flat:
        dist.broadcast(flatten_tensors(tensors), src=0, group=group)
    else:
        for t in tensors:
            dist.broadcast(t, src=0, group=group)
    return done.result(timeout=60)


def test_update_from_distributed_per_tensor_and_flattened(tiny, server, client, learner_group):
    # Per-tensor broadcasts, half of them in bfloat16: the server converts to its float32 model.
    weights = new_weights(tiny, seed=10)
    dtypes = {n: (torch.bfloat16 if i % 2 else torch.float32) for i, n in enumerate(weights)}
    result = broadcast_update(client, server, learner_group, weights, dtypes, "step-1")
    assert result["success"] and "step-1" in result["message"]
    applied = {n: w.to(dtypes[n]).float() for n, w in weights.items()}
    before = assert_probe_matches(server, applied)
    assert before["meta_info"]["weight_version"] == "step-1"
    assert client.get_weight_version() == {server.url: "step-1"}

    # One unknown name: the tensors are still received (no hang), nothing is applied, 400 + message.
    bad = new_weights(tiny, seed=11)
    names = list(bad) + ["model.layers.0.not_a_weight"]
    tensors = [bad[n] for n in bad] + [torch.ones(3)]
    done = client.submit(requests.post, server.url + "/update_weights_from_distributed", timeout=60, json={
        "names": names, "dtypes": ["float32"] * len(names), "shapes": [list(t.shape) for t in tensors],
        "group_name": GROUP, "weight_version": "step-bad"})
    for t in tensors:
        dist.broadcast(t, src=0, group=learner_group)
    response = done.result(timeout=60)
    assert response.status_code == 400
    body = response.json()
    assert body["success"] is False and "model.layers.0.not_a_weight" in body["message"]
    after = probe(server)
    assert after["output_ids"] == before["output_ids"]
    assert after["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]
    assert client.get_weight_version() == {server.url: "step-1"}

    # A shape mismatch through the client raises an error naming server, endpoint and tensor.
    name = "model.norm.weight"
    done = client.submit(client.update_weights_from_distributed, server.url, [name], [torch.float32], [[7]], GROUP)
    dist.broadcast(torch.ones(7), src=0, group=learner_group)
    with pytest.raises(SGLangError) as info:
        done.result(timeout=60)
    assert server.url in str(info.value) and "/update_weights_from_distributed" in str(info.value)
    assert name in str(info.value) and "shape mismatch" in str(info.value)

    # flattened_bucket: one uint8 broadcast carrying mixed dtypes.
    weights = new_weights(tiny, seed=12)
    dtypes = {n: (torch.float32 if i % 3 else torch.bfloat16) for i, n in enumerate(weights)}
    result = broadcast_update(client, server, learner_group, weights, dtypes, "step-2", flat=True)
    assert result["success"]
    assert_probe_matches(server, {n: w.to(dtypes[n]).float() for n, w in weights.items()})
    assert client.get_weight_version() == {server.url: "step-2"}


def test_update_from_disk(tiny, server, client, tmp_path):
    weights = new_weights(tiny, seed=20)
    good = tmp_path / "good"
    good.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(good / "model.safetensors"))
    result = client.update_weights_from_disk(str(good), weight_version="disk-1")[server.url]
    assert result["success"] and result["num_paused_requests"] == 0
    before = assert_probe_matches(server, weights)
    assert before["meta_info"]["weight_version"] == "disk-1"

    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({**{k: v + 1.0 for k, v in weights.items()}, "model.extra.weight": torch.ones(2)},
              str(bad / "model.safetensors"))
    with pytest.raises(SGLangError) as info:
        client.update_weights_from_disk(str(bad), weight_version="disk-bad")
    assert "model.extra.weight" in str(info.value) and "/update_weights_from_disk" in str(info.value)
    assert probe(server)["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]
    assert client.get_weight_version() == {server.url: "disk-1"}


def test_group_errors_do_not_hang(server, client):
    unknown = requests.post(server.url + "/update_weights_from_distributed", timeout=30, json={
        "names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[32]], "group_name": "no_such_group"})
    assert unknown.status_code == 400 and "no_such_group" in unknown.json()["message"]
    nccl = requests.post(server.url + "/init_weights_update_group", timeout=30, json={
        "master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1, "world_size": 2,
        "group_name": "g2", "backend": "nccl"})
    assert nccl.status_code == 400 and "CUDA" in nccl.json()["message"]
    with pytest.raises(SGLangError, match="does not exist"):
        client.destroy_weights_update_group(server.url, "never_made")


class _RunsCommand:
    """A pickle that runs a shell command when unpickled by a plain unpickler."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_update_from_tensor_and_memory_occupation(tiny, server, client, tmp_path):
    import base64
    import pickle

    from erc_megatron.rollout.tensor_payload import encode_named_tensors

    # Two calls: the first staged (flush_cache=false), the second applies both with its version.
    weights = new_weights(tiny, seed=30)
    names = list(weights)
    half = len(names) // 2
    first = [(n, weights[n].to(torch.bfloat16 if i % 2 else torch.float32)) for i, n in enumerate(names[:half])]
    second = [(n, weights[n].clone()) for n in names[half:]]
    client.update_weights_from_tensor(server.url, [encode_named_tensors(first)], flush_cache=False)
    assert client.get_weight_version()[server.url] != "tensor-1"  # staged, not live
    result = client.update_weights_from_tensor(server.url, [encode_named_tensors(second)], weight_version="tensor-1")
    assert result["success"] and "tensor-1" in result["message"]
    applied = {**{n: t.float() for n, t in first}, **dict(second)}
    before = assert_probe_matches(server, applied)
    assert before["meta_info"]["weight_version"] == "tensor-1"

    # A payload that would run a command under a plain unpickler: refused by name, never run.
    marker = tmp_path / "pwned"
    evil = base64.b64encode(pickle.dumps([("model.norm.weight", _RunsCommand(f"touch {marker}"))])).decode()
    with pytest.raises(SGLangError) as info:
        client.update_weights_from_tensor(server.url, [evil], weight_version="evil")
    assert "/update_weights_from_tensor" in str(info.value) and "system" in str(info.value)
    assert "not allowed" in str(info.value)
    assert not marker.exists(), "the server ran code from a pickle"
    with pytest.raises(SGLangError, match="load_format"):
        client.update_weights_from_tensor(server.url, [encode_named_tensors(second)], load_format="flattened_bucket")
    assert probe(server)["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]
    assert client.get_weight_version() == {server.url: "tensor-1"}

    # release: /generate and weight updates are refused with the reason; resume restores the weights
    with pytest.raises(SGLangError, match="tags must be a subset"):
        client.release_memory_occupation(["gpu_everything"])
    client.release_memory_occupation(None)
    r = requests.post(server.url + "/generate", timeout=60, json={"input_ids": PROBE, "sampling_params": {}})
    assert r.status_code == 400 and "release_memory_occupation" in r.json()["error"]["message"], r.text
    with pytest.raises(SGLangError, match="resume_memory_occupation"):
        client.update_weights_from_tensor(server.url, [encode_named_tensors(second)])
    client.resume_memory_occupation(["kv_cache"])
    r = requests.post(server.url + "/generate", timeout=60, json={"input_ids": PROBE, "sampling_params": {}})
    assert r.status_code == 400 and "weights" in r.json()["error"]["message"], r.text
    client.resume_memory_occupation(["weights"])
    after = probe(server)
    assert after["output_ids"] == before["output_ids"]
    assert after["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]
