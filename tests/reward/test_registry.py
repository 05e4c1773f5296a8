import math
import textwrap

import pytest

from erc_megatron.model.config import ConfigError
from erc_megatron.reward.math_reward import math_reward
from erc_megatron.reward.registry import RewardConfig, compute_rewards, load_reward_fn

USER_MODULE = textwrap.dedent('''
    NOT_CALLABLE = 3

    def length_reward(response_text, ground_truth, *, scale=1.0, **extra):
        return {"score": scale * (len(response_text) - len(ground_truth)), "length": len(response_text),
                "source_is_b": float(extra.get("data_source") == "b")}

    def plain(response_text, ground_truth, **extra):
        return 1 if response_text == ground_truth else 0

    class Holder:
        @staticmethod
        def nested(response_text, ground_truth, **extra):
            return -1.0

    def nan_reward(response_text, ground_truth, **extra):
        return float("nan")

    def text_reward(response_text, ground_truth, **extra):
        return "good"

    def no_score(response_text, ground_truth, **extra):
        return {"acc": 1.0}

    def shifting_keys(response_text, ground_truth, **extra):
        return {"score": 0.0, "a": 1.0} if response_text == "x" else {"score": 0.0}
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_mod"


def test_load_by_colon_and_dotted_path():
    assert load_reward_fn("erc_megatron.reward.math_reward:math_reward") is math_reward
    assert load_reward_fn("erc_megatron.reward.math_reward.math_reward") is math_reward


def test_bound_kwargs_change_the_result():
    fn = load_reward_fn("erc_megatron.reward.math_reward:math_reward", {"reasoning_end_tag": "</think>"})
    assert fn("\\boxed{8}", "8") == 0.5          # tag required and missing
    assert load_reward_fn(RewardConfig().fn)("\\boxed{8}", "8") == 1.0


def test_user_function_with_metrics_and_extras(user_module):
    fn = load_reward_fn(f"{user_module}:length_reward", {"scale": 2.0})
    batch = compute_rewards(fn, ["abcd", "a", "abc"], ["ab", "ab", "ab"],
                            extras=[{"data_source": "a"}, {"data_source": "b"}, {}])
    assert batch.scores == [4.0, -2.0, 2.0]
    assert batch.metrics == {"length": [4.0, 1.0, 3.0], "source_is_b": [0.0, 1.0, 0.0]}
    means = batch.mean_metrics()
    assert means["reward/score"] == pytest.approx(4 / 3)
    assert means["reward/length"] == pytest.approx(8 / 3)
    nested = load_reward_fn(f"{user_module}:Holder.nested")
    assert compute_rewards(nested, ["x"], ["y"]).scores == [-1.0]
    plain = compute_rewards(load_reward_fn(f"{user_module}:plain"), ["x", "y"], ["x", "x"])
    assert plain.scores == [1.0, 0.0] and plain.metrics == {}


def test_math_reward_through_compute_rewards():
    batch = compute_rewards(load_reward_fn("erc_megatron.reward.math_reward:math_reward_detailed"),
                            ["\\boxed{0.5}", "\\boxed{2}", "none"], ["1/2", "3", "1"])
    assert batch.scores == [1.0, -1.0, -1.0]
    assert batch.metrics["acc"] == [1.0, 0.0, 0.0]
    assert batch.metrics["has_boxed"] == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("path, needle", [
    ("no_such_module_xyz:fn", "module 'no_such_module_xyz' not found"),
    ("erc_megatron.reward.math_reward:nope", "has no attribute 'nope'"),
    ("erc_megatron.reward.registry:DEFAULT_REWARD_FN", "not callable"),
    ("justaname", "must look like 'package.module:function'"),
    ("", "must look like 'package.module:function'"),
    ("mod:", "must look like 'package.module:function'"),
])
def test_load_errors(path, needle):
    with pytest.raises(ConfigError) as exc:
        load_reward_fn(path)
    assert needle in str(exc.value)
    if path:
        assert repr(path) in str(exc.value)


def test_missing_attribute_lists_callables():
    with pytest.raises(ConfigError, match="math_reward_detailed"):
        load_reward_fn("erc_megatron.reward.math_reward:nope")


def test_reward_config_validation():
    with pytest.raises(ConfigError, match="package.module:function"):
        RewardConfig(fn="nomodule")
    assert RewardConfig(fn="a.b:c", kwargs={"x": 1}).kwargs == {"x": 1}


def test_contract_violations_are_named(user_module):
    with pytest.raises(ValueError, match="non-finite score nan for sample 0"):
        compute_rewards(load_reward_fn(f"{user_module}:nan_reward"), ["x"], ["y"])
    with pytest.raises(TypeError, match="returned score 'good'.*sample 1"):
        compute_rewards(_first_ok_then(load_reward_fn(f"{user_module}:text_reward")), ["x", "y"], ["y", "y"])
    with pytest.raises(ValueError, match="without 'score'.*keys \\['acc'\\]"):
        compute_rewards(load_reward_fn(f"{user_module}:no_score"), ["x"], ["y"])
    with pytest.raises(ValueError, match="same keys"):
        compute_rewards(load_reward_fn(f"{user_module}:shifting_keys"), ["x", "y"], ["y", "y"])
    with pytest.raises(ValueError, match="same keys"):
        compute_rewards(load_reward_fn(f"{user_module}:shifting_keys"), ["y", "x"], ["y", "y"])
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        compute_rewards(math_reward, ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="1 responses but 2 extras"):
        compute_rewards(math_reward, ["a"], ["a"], extras=[{}, {}])


def _first_ok_then(fn):
    calls = []

    def wrapped(response_text, ground_truth, **extra):
        calls.append(1)
        return 0.0 if len(calls) == 1 else fn(response_text, ground_truth, **extra)

    wrapped.__name__ = "text_reward"
    return wrapped


def test_numeric_types_accepted():
    import torch

    batch = compute_rewards(lambda r, g: torch.tensor(0.25), ["x"], ["y"])
    assert batch.scores == [0.25] and not math.isnan(batch.scores[0])
    with pytest.raises(TypeError, match="expected a number"):
        compute_rewards(lambda r, g: True, ["x"], ["y"])
