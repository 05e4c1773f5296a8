"""Rollout for one RL step, with DAPO dynamic sampling (runs on the learner's rank 0).

Rewards come from erc_megatron.reward.score (dynamic sampling keeps the groups whose rewards
differ, so each round is scored as it arrives); advantages are set afterwards, on the kept groups,
by erc_megatron.algo.set_group_advantages (the trainer's collect phase, erc_megatron.train.phases).

Each prompt is sent `n` times with n=1 and its own `sampling_seed` (derived from the run seed, the
step, the round and the sample), so a run resumed from a checkpoint regenerates exactly the same
responses, and every sample's position in the batch is explicit.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from erc_megatron.algo import DynamicSampler
from erc_megatron.reward.score import score_responses

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One response with everything the learner needs."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    answer: str
    reward: float
    rollout_logprobs: list[float]
    finish_reason: str
    group: int
    advantage: float = 0.0
    metrics: dict = field(default_factory=dict)


def sampling_params(rollout_cfg, max_new_tokens: int | None = None, temperature: float | None = None,
                    top_p: float | None = None) -> dict:
    params = {"max_new_tokens": max_new_tokens or rollout_cfg.max_response_length,
              "temperature": rollout_cfg.temperature if temperature is None else temperature,
              "top_p": rollout_cfg.top_p if top_p is None else top_p,
              "top_k": rollout_cfg.top_k, "n": 1}
    if rollout_cfg.stop:
        params["stop"] = list(rollout_cfg.stop)
    return params


def _seed(run_seed: int, step: int, round_: int, index: int) -> int:
    return (run_seed * 1_000_003 + step * 10_007 + round_ * 101 + index) % (2**31 - 1)


def generate_groups(client, prompts: list[dict], n: int, params: dict, reward_fn, run_seed: int, step: int,
                    round_: int, overlong: tuple[int, int] | None = None) -> tuple[list[list[Sample]], torch.Tensor]:
    """n samples per prompt, scored; returns groups and their [groups * n] rewards."""
    inputs, seeds = [], []
    for i, p in enumerate(prompts):
        for j in range(n):
            inputs.append(p["prompt_ids"])
            seeds.append(_seed(run_seed, step, round_, i * n + j))
    outputs = client.generate(inputs, [dict(params, sampling_seed=s) for s in seeds], return_logprob=True)
    texts = [o["text"] for o in outputs]
    answers = [p["answer"] for p in prompts for _ in range(n)]
    rewards, reward_metrics = score_responses(reward_fn, texts, answers, [len(o["output_ids"]) for o in outputs],
                                              overlong)
    groups: list[list[Sample]] = []
    for i, p in enumerate(prompts):
        group = []
        for j in range(n):
            k = i * n + j
            o = outputs[k]
            meta = o.get("meta_info", {})
            lps = [float(t[0]) if t[0] is not None else 0.0 for t in meta.get("output_token_logprobs", [])]
            group.append(Sample(prompt_ids=list(p["prompt_ids"]), response_ids=list(o["output_ids"]),
                                response_text=o["text"], answer=p["answer"], reward=float(rewards[k]),
                                rollout_logprobs=lps, finish_reason=(meta.get("finish_reason") or {}).get("type", ""),
                                group=p.get("index", i),
                                metrics={m: v[k] for m, v in reward_metrics.items()}))
        groups.append(group)
    return groups, rewards


def reward_function_metrics(samples: list[Sample]) -> dict[str, float]:
    """`reward/<key>`: the mean over `samples` of each extra metric the reward function returned
    (e.g. math_reward's `acc`, `has_boxed`), over the samples that carry it."""
    sums: dict[str, list[float]] = {}
    for s in samples:
        for key, value in s.metrics.items():
            sums.setdefault(key, []).append(float(value))
    return {f"reward/{key}": sum(v) / len(v) for key, v in sums.items()}


def collect_step(client, iterator, cfg, reward_fn, step: int, progress=None) -> tuple[list[list[Sample]], dict]:
    """Generate and score until `prompts_per_step` informative groups (dynamic sampling).

    The samples' `advantage` is left at 0: the caller sets it on the kept groups.

    `progress(kept_groups, target_groups)` is called after each generation round.
    """
    t0 = time.perf_counter()
    rc = cfg.rollout
    n = rc.n_samples_per_prompt
    target = cfg.trainer.prompts_per_step
    params = sampling_params(rc)
    overlong = (rc.max_response_length, rc.overlong_buffer) if rc.overlong_buffer else None
    all_rewards, generated = [], 0
    all_samples: list[Sample] = []
    if rc.dynamic_sampling and n > 1:
        sampler = DynamicSampler(target, n, rc.max_extra_rounds, allow_partial=True)
        round_ = 0
        while not sampler.done:
            want = target if round_ == 0 else sampler.missing
            prompts = iterator.next_batch(want)
            groups, rewards = generate_groups(client, prompts, n, params, reward_fn, cfg.trainer.seed, step, round_,
                                              overlong)
            generated += len(groups)
            all_rewards.append(rewards)
            all_samples += [s for g in groups for s in g]
            sampler.add(groups, rewards)
            round_ += 1
            if progress is not None:
                progress(sampler.kept, target)
        groups = sampler.take()
    else:
        prompts = iterator.next_batch(target)
        groups, rewards = generate_groups(client, prompts, n, params, reward_fn, cfg.trainer.seed, step, 0, overlong)
        generated = len(groups)
        all_rewards.append(rewards)
        all_samples += [s for g in groups for s in g]
    rewards_all = torch.cat(all_rewards) if all_rewards else torch.zeros(0)
    metrics = {**reward_function_metrics(all_samples),
        "rollout/reward_mean": float(rewards_all.mean()) if rewards_all.numel() else float("nan"),
        "rollout/accuracy": float((rewards_all > 0).double().mean()) if rewards_all.numel() else float("nan"),
        "rollout/response_length": float(sum(len(s.response_ids) for s in all_samples) / max(1, len(all_samples))),
        "rollout/groups_generated": float(generated),
        "rollout/groups_kept": float(len(groups)),
        "time/rollout": time.perf_counter() - t0,
    }
    return groups, metrics


def validate(client, dataset, cfg, reward_fn) -> dict:
    """avg@k accuracy (reward > 0) and mean reward over the held-out prompts."""
    vc = cfg.validation
    items = [dataset[i] for i in range(len(dataset))][: vc.max_prompts or None]
    if not items:
        return {}
    params = sampling_params(cfg.rollout, max_new_tokens=vc.max_response_length, temperature=vc.temperature,
                             top_p=vc.top_p)
    groups, rewards = generate_groups(client, items, vc.n_samples, params, reward_fn, cfg.trainer.seed + 7, 0, 0)
    return {"val/accuracy": float((rewards > 0).double().mean()), "val/reward_mean": float(rewards.mean()),
            "val/response_length": sum(len(s.response_ids) for g in groups for s in g) / max(1, rewards.numel())}
