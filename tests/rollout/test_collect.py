"""`collect_step` against a real embedded server: the reward function's extra per-sample metrics
(anything besides `score` in the dict it returns) reach the step's logs as `reward/<key>`, averaged
over every generated sample, the same samples `rollout/reward_mean` averages."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from erc_megatron.data.prompts import PromptDataset, PromptIterator
from erc_megatron.rollout.client import SGLangClient
from erc_megatron.rollout.collect import collect_step
from erc_megatron.rollout_server.server import start_server_in_thread
from erc_megatron.train.config import RolloutConfig
from tests.rollout.tiny_model import build_tiny_model

SEEN: list[dict] = []


def length_reward(response_text: str, ground_truth: str) -> dict:
    """Score 1 for an even-length response; extra metrics: the length and a constant."""
    out = {"score": float(len(response_text) % 2 == 0), "length": float(len(response_text)), "one": 1.0}
    SEEN.append(out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = build_tiny_model(str(tmp_path_factory.mktemp("tiny_collect")), seed=3)
    handle = start_server_in_thread(tiny.path, num_threads=1)
    yield handle
    handle.shutdown()


@pytest.mark.parametrize("dynamic", [False, True])
def test_reward_function_metrics_reach_the_step_logs(server, dynamic):
    SEEN.clear()
    items = [dict(prompt_ids=[1 + i, 5, 7], prompt_text=f"p{i}", answer="x", index=i) for i in range(6)]
    iterator = PromptIterator(PromptDataset(items, "inline"), shuffle=False)
    rollout = RolloutConfig(n_samples_per_prompt=4, temperature=1.0, max_response_length=6,
                            dynamic_sampling=dynamic, max_extra_rounds=1)
    cfg = SimpleNamespace(rollout=rollout, trainer=SimpleNamespace(prompts_per_step=2, seed=11))
    client = SGLangClient([server.url], timeout=60, max_retries=1)
    try:
        groups, metrics = collect_step(client, iterator, cfg, length_reward, step=1)
    finally:
        client.close()
    assert SEEN and len(SEEN) % 4 == 0  # every generated sample was scored, dropped groups included
    n = len(SEEN)
    assert metrics["reward/length"] == pytest.approx(sum(s["length"] for s in SEEN) / n, rel=1e-12)
    assert metrics["reward/one"] == 1.0
    assert metrics["rollout/reward_mean"] == pytest.approx(sum(s["score"] for s in SEEN) / n, rel=1e-12)
    assert "reward/score" not in metrics  # the score is rollout/reward_mean already
    kept = [s for g in groups for s in g]
    assert all(set(s.metrics) == {"length", "one"} for s in kept)
