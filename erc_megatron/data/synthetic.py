"""A tiny verifiable task for the CPU demo: small-number addition answered as `\\boxed{sum}`.

Prompt `"13+5="` (as one user chat message), correct response `"\\boxed{18}"` followed by the
end-of-turn token: at most five response tokens with the demo tokenizer, so a rollout costs a few
forward passes of a tiny model. The ground truth is the plain integer string, which
`math_reward` scores (+1 / -1) exactly like a real math data set.

Held-out evaluation is on operand pairs that never occur in the training file, so validation
accuracy measures a behaviour of the policy rather than recall of the training prompts.

`noisy_answer` builds the deliberately wrong supervised targets of the demo's warm start: a
systematic offset (by default always `+1`) rather than uniform noise, so that with noise > 0.5 the
wrong answer is the model's mode on every prompt (greedy accuracy starts low), the right answer
keeps probability ~(1 - noise) (sampled groups have mixed rewards, which DAPO's group advantages
need), and one global behaviour, shared by all prompts, is what RL has to unlearn; that is also
why it carries over to held-out pairs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from erc_megatron.model.config import ConfigError


@dataclass
class AdditionTaskConfig:
    """Shape of the synthetic addition data set."""

    max_operand: int = 19
    """Operands are drawn from 0..max_operand (19: 400 pairs, 80 of them held out at the default fraction)."""
    val_pair_fraction: float = 0.2
    """Fraction of the distinct (a, b) pairs held out for validation only."""
    num_train: int = 2000
    """Rows in train.jsonl (sampled with replacement from the training pairs)."""
    num_val: int | None = None
    """Rows in val.jsonl; None writes each held-out pair exactly once."""
    seed: int = 0
    """Seed for the pair split and the row sampling."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_operand <= 99:
            raise ConfigError(f"task.max_operand must be in 1..99, got {self.max_operand}")
        n_pairs = (self.max_operand + 1) ** 2
        if not 0.0 < self.val_pair_fraction < 1.0:
            raise ConfigError(f"task.val_pair_fraction must be in (0, 1), got {self.val_pair_fraction}")
        n_val = round(n_pairs * self.val_pair_fraction)
        if n_val < 1 or n_val >= n_pairs:
            raise ConfigError(f"task.val_pair_fraction {self.val_pair_fraction} leaves {n_val} of {n_pairs} "
                              f"pairs for validation; need at least one pair on each side")
        if self.num_train < 1:
            raise ConfigError(f"task.num_train must be >= 1, got {self.num_train}")
        if self.num_val is not None and self.num_val < 1:
            raise ConfigError(f"task.num_val must be >= 1 or None, got {self.num_val}")


def format_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def format_response(answer: int | str) -> str:
    return f"\\boxed{{{answer}}}"


def split_pairs(config: AdditionTaskConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train pairs, held-out pairs), disjoint, deterministic in `config.seed`."""
    pairs = [(a, b) for a in range(config.max_operand + 1) for b in range(config.max_operand + 1)]
    random.Random(config.seed).shuffle(pairs)
    n_val = round(len(pairs) * config.val_pair_fraction)
    return sorted(pairs[n_val:]), sorted(pairs[:n_val])


def make_row(a: int, b: int) -> dict:
    """One data set row: chat-message prompt and the integer answer as a string."""
    return {"prompt": [{"role": "user", "content": format_prompt(a, b)}], "answer": str(a + b)}


def make_rows(config: AdditionTaskConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows) for train.jsonl / val.jsonl."""
    train_pairs, val_pairs = split_pairs(config)
    rng = random.Random(config.seed + 1)
    train = [make_row(*rng.choice(train_pairs)) for _ in range(config.num_train)]
    if config.num_val is None:
        val = [make_row(a, b) for a, b in val_pairs]
    else:
        val = [make_row(*rng.choice(val_pairs)) for _ in range(config.num_val)]
    return train, val


def noisy_answer(correct: int, rng: random.Random, noise: float, offsets: tuple[int, ...]) -> int:
    """`correct`, or with probability `noise` `correct + offset` for an offset drawn from `offsets`."""
    if rng.random() < noise:
        return correct + rng.choice(offsets)
    return correct
