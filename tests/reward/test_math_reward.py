import random
import threading

import pytest
from math_verify import parse, verify

from erc_megatron.reward.math_reward import extract_boxed, is_equivalent, math_reward, math_reward_detailed


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{8}", "8"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\sqrt{\\frac{a}{b^{2}}}} done", "\\sqrt{\\frac{a}{b^{2}}}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),           # the last box counts
    ("\\boxed{1} and \\fbox{3}", "3"),
    ("\\boxed{}", ""),
    ("no box here: 8", None),
    ("truncated \\boxed{\\frac{1}{2", None),
    ("\\boxed{1} then unclosed \\boxed{2", None),          # the last box is unclosed: no answer
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("response, truth, expected", [
    ("The answer is \\boxed{8}", "8", 1.0),
    ("The answer is \\boxed{9}", "8", -1.0),
    ("\\boxed{0.5}", "1/2", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0),
    ("\\boxed{1+x^2}", "x^2+1", 1.0),
    ("\\boxed{0.51}", "1/2", -1.0),
    ("\\boxed{8}", "\\boxed{8}", 1.0),                     # reference already boxed
    ("\\boxed{8}", "$8$", 1.0),                             # reference in math mode
    ("8", "8", -1.0),                                       # no box: not an answer
    ("\\boxed{8} wait, \\boxed{7}", "8", -1.0),             # only the last box counts
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}", 1.0),
])
def test_math_reward(response, truth, expected):
    assert math_reward(response, truth) == expected


def test_reasoning_end_tag_and_penalty():
    kw = dict(reasoning_end_tag="</think>")
    assert math_reward("<think>x</think> \\boxed{8}", "8", **kw) == 1.0
    # the answer is read after the end tag, so a box inside the reasoning does not count
    assert math_reward("<think>\\boxed{8}</think> I give up", "8", **kw) == -1.0
    # missing tag: the configured penalty comes on top of the score
    assert math_reward("<think>\\boxed{8}", "8", **kw) == 1.0 - 0.5
    assert math_reward("<think>\\boxed{9}", "8", **kw) == -1.0 - 0.5
    assert math_reward("<think>\\boxed{9}", "8", missing_end_tag_penalty=0.25, **kw) == -1.25
    d = math_reward_detailed("<think>\\boxed{8}", "8", **kw)
    assert d == {"score": 0.5, "acc": 1.0, "has_boxed": 1.0, "end_tag_missing": 1.0}
    # without a configured tag there is never a penalty
    assert math_reward("\\boxed{8}", "8") == 1.0


def test_custom_scores_and_extra_fields_ignored():
    assert math_reward("\\boxed{8}", "8", correct_score=2.0, data_source="x") == 2.0
    assert math_reward("\\boxed{7}", "8", incorrect_score=0.0, data_source="x") == 0.0


def test_integer_shortcut_agrees_with_math_verify():
    rng = random.Random(0)
    pairs = [("+7", "7"), ("07", "7"), ("-0", "0"), ("-3", "-3"), ("3", "-3"), ("1000", "1,000")]
    for _ in range(40):
        b = rng.randint(-30, 30)
        a = rng.choice([b, b + rng.choice([-1, 1, 10])])
        pairs.append((rng.choice([str(a), f"+{a}" if a >= 0 else str(a), f"0{a}" if a >= 0 else str(a)]), str(b)))
    for a, b in pairs:
        expected = bool(verify(parse("\\boxed{" + b + "}"), parse("\\boxed{" + a + "}")))
        assert is_equivalent(a, b) == expected, (a, b)
        assert math_reward(f"\\boxed{{{a}}}", b) == (1.0 if expected else -1.0)


def test_works_off_the_main_thread():
    # math-verify's default timeout uses SIGALRM, which raises off the main thread.
    results = {}

    def work():
        results["ok"] = (math_reward("\\boxed{0.5}", "1/2"), math_reward("\\boxed{x}", "1/2"))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert results["ok"] == (1.0, -1.0)
