import numpy as np
import pytest

from erc_megatron.reward.score import score_responses


def _reward(response_text, ground_truth, **extra):
    return {"score": 1.0 if response_text == ground_truth else 0.0, "chars": len(response_text)}


def test_scores_plus_overlong_penalty_against_float64_reference():
    texts, answers = ["a", "b", "a", "cc"], ["a", "a", "a", "cc"]
    lengths = [3, 6, 8, 10]
    max_len, buffer = 8, 4
    rewards, metrics = score_responses(_reward, texts, answers, lengths, (max_len, buffer))
    # DAPO: 0 up to max_len - buffer, then linear down to -1 at max_len, -1 beyond
    penalty = [0.0 if y <= max_len - buffer else (((max_len - buffer) - y) / buffer if y <= max_len else -1.0)
               for y in lengths]
    ref = np.array([1.0, 0.0, 1.0, 1.0]) + np.array(penalty)
    np.testing.assert_allclose(rewards.numpy(), ref, rtol=0, atol=1e-7)
    assert rewards.dtype.is_floating_point and rewards.dtype.itemsize == 8
    assert metrics == {"chars": [1.0, 1.0, 1.0, 2.0]}
    plain, _ = score_responses(_reward, texts, answers, lengths)
    np.testing.assert_array_equal(plain.numpy(), [1.0, 0.0, 1.0, 1.0])


def test_lengths_must_match_responses():
    with pytest.raises(ValueError, match="2 responses but 1 lengths"):
        score_responses(_reward, ["a", "b"], ["a", "b"], [1])
