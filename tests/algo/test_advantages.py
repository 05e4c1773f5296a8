import numpy as np
import pytest
import torch

from erc_megatron.algo import (
    DynamicSampler,
    DynamicSamplingExhausted,
    broadcast_to_tokens,
    dynamic_sampling_filter,
    group_advantages,
    overlong_penalty,
)


def test_group_advantages_match_numpy_unbiased_std():
    rng = np.random.default_rng(0)
    for group_size in (2, 3, 8):
        r = rng.normal(size=5 * group_size)
        r[:group_size] = 0.5  # an all-equal group
        r[group_size: 2 * group_size] = rng.choice([-1.0, 1.0], size=group_size)
        adv = group_advantages(torch.tensor(r, dtype=torch.float64), group_size)
        g = r.reshape(-1, group_size)
        ref = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
        np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-12, atol=1e-15)
        assert torch.all(adv[:group_size] == 0)


def test_group_advantages_dtype_and_validation():
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        group_advantages(torch.ones(4), 3)


def test_broadcast_to_tokens():
    adv = torch.tensor([0.5, -2.0])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.float32)
    out = broadcast_to_tokens(adv, mask)
    assert torch.equal(out, torch.tensor([[0.0, 0.5, 0.5], [-2.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="adv_per_seq"):
        broadcast_to_tokens(adv[:1], mask)


def test_dynamic_sampling_filter():
    r = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.2, 0.2, 0.2])
    assert dynamic_sampling_filter(r, 3).tolist() == [True, True, False, False]


def _round(keep_pattern):
    """Groups named by index with rewards varying (kept) or constant (dropped)."""
    rewards = torch.tensor([[0.0, 1.0] if k else [1.0, 1.0] for k in keep_pattern])
    return list(range(len(keep_pattern))), rewards


def test_dynamic_sampler_refills_and_truncates():
    s = DynamicSampler(target_groups=5, group_size=2, max_extra_rounds=3)
    assert s.add(*_round([1, 0, 1, 0])) == 2 and s.missing == 3 and not s.done
    assert s.add(*_round([0, 0, 0])) == 0 and s.missing == 3
    assert s.add(*_round([1, 1, 1, 1])) == 4 and s.done and s.rounds == 3
    batch = s.take()
    assert batch == [0, 2, 0, 1, 2]  # exactly target_groups, surplus of the last round dropped
    assert s.rounds == 0 and s.kept == 0  # reset for the next step
    with pytest.raises(RuntimeError, match="still missing"):
        s.take()


def test_dynamic_sampler_round_cap():
    s = DynamicSampler(target_groups=4, group_size=2, max_extra_rounds=1)
    s.add(*_round([1, 0]))
    with pytest.raises(DynamicSamplingExhausted, match="kept 2 of 4 groups after 2 rounds"):
        s.add(*_round([0, 1]))
    p = DynamicSampler(target_groups=4, group_size=2, max_extra_rounds=0, allow_partial=True)
    with pytest.warns(RuntimeWarning, match="max_extra_rounds=0"):
        p.add(*_round([1, 0, 1]))
    assert p.done and p.take() == [0, 2]
    with pytest.raises(ValueError, match="3 groups but rewards for 2 groups"):
        DynamicSampler(2, 2, 1).add([0, 1, 2], torch.zeros(4))


def test_overlong_penalty_three_cases():
    max_len, cache = 20, 8  # ramp over (12, 20]
    lengths = torch.tensor([0, 5, 12, 13, 16, 20, 21, 100])
    out = overlong_penalty(lengths, max_len, cache)
    expect = [0.0, 0.0, 0.0, (12 - 13) / 8, (12 - 16) / 8, (12 - 20) / 8, -1.0, -1.0]
    assert out.tolist() == pytest.approx(expect, abs=0, rel=1e-7)
    assert out[5].item() == -1.0  # the ramp reaches -1 exactly at max_len
    assert overlong_penalty(torch.tensor([10, 11]), 10, 0).tolist() == [0.0, -1.0]
    with pytest.raises(ValueError, match=r"cache_len must be in \[0, max_len=10\]"):
        overlong_penalty(lengths, 10, 11)
    with pytest.raises(ValueError, match="integers"):
        overlong_penalty(lengths, 10.5, 2)


def test_set_group_advantages_writes_each_response_its_group_value():
    from dataclasses import dataclass

    from erc_megatron.algo import set_group_advantages

    @dataclass
    class Resp:
        reward: float
        advantage: float = 0.0

    rng = np.random.default_rng(1)
    r = rng.normal(size=(3, 4))
    r[1] = 2.0  # an all-equal group gets 0
    groups = [[Resp(float(x)) for x in row] for row in r]
    out = set_group_advantages(groups)
    ref = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose([[x.advantage for x in g] for g in groups], ref, rtol=1e-12, atol=1e-15)
    assert all(x.advantage == 0.0 for x in groups[1])
    assert set_group_advantages([]).numel() == 0
    with pytest.raises(ValueError, match="must all have 4 responses"):
        set_group_advantages([groups[0], groups[1][:3]])
