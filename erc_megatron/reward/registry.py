"""Reward functions chosen by import path, and batch scoring with a checked return contract.

A reward function is any callable

    fn(response_text: str, ground_truth: str, **extra) -> float | dict

where a dict must hold a numeric `score` and may add other numeric per-sample metrics (averaged
into the step's logs, e.g. `acc`). `extra` carries the data set row's other fields when the caller
passes them. Users extend the trainer by writing such a function in their own module and naming it
(`reward.fn: mypkg.rewards:my_reward`) rather than by subclassing anything.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from erc_megatron.model.config import ConfigError
from erc_megatron.utils.import_path import load_callable, split_path

RewardFn = Callable[..., "float | dict"]
DEFAULT_REWARD_FN = "erc_megatron.reward.math_reward:math_reward"


@dataclass
class RewardConfig:
    """Which reward function scores the rollouts."""

    fn: str = DEFAULT_REWARD_FN
    """Import path `package.module:function` (or `package.module.function`) of the reward function."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments bound to the function, e.g. {reasoning_end_tag: "</think>"}."""

    def __post_init__(self) -> None:
        split_path(self.fn, "reward.fn")
        if not isinstance(self.kwargs, dict):
            raise ConfigError(f"reward.kwargs must be a mapping, got {self.kwargs!r}")


def load_reward_fn(path: str, kwargs: dict[str, Any] | None = None) -> RewardFn:
    """Import the reward function at `path`; `kwargs` are bound to it with functools.partial."""
    fn = load_callable(path, "reward function")
    if kwargs:
        fn = functools.partial(fn, **kwargs)
        fn.__name__ = path  # type: ignore[attr-defined]
    return fn


@dataclass
class RewardBatch:
    """Scores of a batch of responses and any extra per-sample metrics the function returned."""

    scores: list[float]
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def mean_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        out = {f"{prefix}score": sum(self.scores) / max(len(self.scores), 1)}
        for key, values in self.metrics.items():
            out[f"{prefix}{key}"] = sum(values) / max(len(values), 1)
        return out


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None) or repr(fn)


def _as_float(value: Any, fn: Callable, index: int, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"reward function {_fn_name(fn)} returned {what} {value!r} ({type(value).__name__}) "
                        f"for sample {index}; expected a number")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"reward function {_fn_name(fn)} returned non-finite {what} {out} for sample {index}")
    return out


def compute_rewards(fn: RewardFn, responses: Sequence[str], answers: Sequence[str],
                    extras: Sequence[dict[str, Any]] | None = None) -> RewardBatch:
    """Score `responses[i]` against `answers[i]` (with `extras[i]` as keyword arguments)."""
    if len(responses) != len(answers):
        raise ValueError(f"compute_rewards: {len(responses)} responses but {len(answers)} answers")
    if extras is not None and len(extras) != len(responses):
        raise ValueError(f"compute_rewards: {len(responses)} responses but {len(extras)} extras")
    scores: list[float] = []
    metrics: dict[str, list[float]] = {}
    keys: set[str] | None = None
    for i, (response, answer) in enumerate(zip(responses, answers)):
        result = fn(response, answer, **(extras[i] if extras is not None else {}))
        if isinstance(result, dict) and "score" not in result:
            raise ValueError(f"reward function {_fn_name(fn)} returned a dict without 'score' for sample {i}: "
                             f"keys {sorted(result)}")
        these = set(result) - {"score"} if isinstance(result, dict) else set()
        if keys is None:
            keys = these
            metrics = {k: [] for k in sorted(keys)}
        elif these != keys:
            raise ValueError(f"reward function {_fn_name(fn)} returned metrics {sorted(these)} for sample {i} "
                             f"but {sorted(keys)} for sample 0; return the same keys every time")
        if isinstance(result, dict):
            for key in keys:
                metrics[key].append(_as_float(result[key], fn, i, f"metric {key!r}"))
            result = result["score"]
        scores.append(_as_float(result, fn, i, "score"))
    return RewardBatch(scores=scores, metrics=metrics)
