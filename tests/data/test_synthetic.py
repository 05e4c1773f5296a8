import random

import pytest

from erc_megatron.data.synthetic import AdditionTaskConfig, make_rows, noisy_answer, split_pairs
from erc_megatron.model.config import ConfigError
from erc_megatron.reward.math_reward import math_reward


def test_split_is_disjoint_complete_and_seeded():
    cfg = AdditionTaskConfig(max_operand=9, val_pair_fraction=0.3, seed=5)
    train, val = split_pairs(cfg)
    assert len(val) == 30 and len(train) == 70
    assert set(train).isdisjoint(val)
    assert set(train) | set(val) == {(a, b) for a in range(10) for b in range(10)}
    assert split_pairs(AdditionTaskConfig(max_operand=9, val_pair_fraction=0.3, seed=5)) == (train, val)
    assert split_pairs(AdditionTaskConfig(max_operand=9, val_pair_fraction=0.3, seed=6))[1] != val


def test_rows_are_scored_correct_by_the_math_reward():
    cfg = AdditionTaskConfig(max_operand=19, num_train=300, seed=1)
    train, val = make_rows(cfg)
    assert len(train) == 300 and len(val) == 80
    train_prompts = {r["prompt"][0]["content"] for r in train}
    assert train_prompts.isdisjoint({r["prompt"][0]["content"] for r in val})
    for row in train[:50] + val:
        (msg,) = row["prompt"]
        assert msg["role"] == "user"
        a, b = msg["content"].rstrip("=").split("+")
        assert row["answer"] == str(int(a) + int(b))
        assert math_reward(f"\\boxed{{{int(a) + int(b)}}}", row["answer"]) == 1.0
        assert math_reward(f"\\boxed{{{int(a) + int(b) + 1}}}", row["answer"]) == -1.0
    assert len(make_rows(AdditionTaskConfig(num_val=7))[1]) == 7


def test_noisy_answer_rate_and_offsets():
    rng = random.Random(0)
    n, noise = 20000, 0.3
    draws = [noisy_answer(10, rng, noise, (1, -2)) - 10 for _ in range(n)]
    wrong = sum(d != 0 for d in draws) / n
    sigma = (noise * (1 - noise) / n) ** 0.5
    assert abs(wrong - noise) < 4 * sigma
    assert set(draws) == {0, 1, -2}
    assert abs(draws.count(1) / max(1, sum(d != 0 for d in draws)) - 0.5) < 0.03
    assert all(noisy_answer(5, rng, 0.0, (1,)) == 5 for _ in range(100))
    assert all(noisy_answer(5, rng, 1.0, (1,)) == 6 for _ in range(100))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_operand=0), "task.max_operand"),
    (dict(val_pair_fraction=1.0), "task.val_pair_fraction"),
    (dict(max_operand=1, val_pair_fraction=0.1), "need at least one pair on each side"),
    (dict(num_train=0), "task.num_train"),
    (dict(num_val=0), "task.num_val"),
])
def test_task_config_validation(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        AdditionTaskConfig(**kwargs)
