"""Rule-based math reward: +1 when the last `\\boxed{}` is equivalent to the reference, else -1.

Equivalence is decided by `math-verify` (so `\\boxed{0.5}` matches `1/2`, `\\dfrac{1}{2}` matches
`\\frac12`), after two shortcuts that cannot change the verdict: identical strings are correct, and
two different plain integers are not. Only the LAST boxed expression counts, as in DAPO / ERC; a
response without one scores the incorrect score.

ERC recipes also require the reasoning to be closed (`</think>`): with `reasoning_end_tag` set,
the answer is read after the last end tag, and a response without the tag gets
`missing_end_tag_penalty` subtracted on top of its score (the released recipes use 0.5).

math-verify times its parsing with SIGALRM, which only works on the main thread; elsewhere
(a reward thread pool) it runs without its own timeout.
"""
from __future__ import annotations

import re
import threading

from math_verify import parse, verify

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_INT = re.compile(r"[+-]?\d+")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces kept; None if absent/unclosed."""
    start = max(text.rfind(cmd + "{") for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    open_at = text.index("{", start)
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i]
    return None


def _gold_for_parsing(ground_truth: str) -> str:
    # A bare reference ("1/2", "\frac{1}{2}") is parsed as if it were boxed, so both sides go
    # through the same LaTeX extraction; references already in math mode are left alone.
    if "\\boxed" in ground_truth or "$" in ground_truth:
        return ground_truth
    return "\\boxed{" + ground_truth + "}"


def is_equivalent(answer: str, ground_truth: str) -> bool:
    """Whether the extracted `answer` (boxed content) is mathematically equal to `ground_truth`."""
    answer, ground_truth = answer.strip(), str(ground_truth).strip()
    if answer == ground_truth:
        return True
    if _INT.fullmatch(answer) and _INT.fullmatch(ground_truth):
        return int(answer) == int(ground_truth)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(_gold_for_parsing(ground_truth), parsing_timeout=timeout)
    pred = parse("\\boxed{" + answer + "}", parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


def math_reward_detailed(response_text: str, ground_truth: str, *, reasoning_end_tag: str | None = None,
                         missing_end_tag_penalty: float = 0.5, correct_score: float = 1.0,
                         incorrect_score: float = -1.0, **extra) -> dict[str, float]:
    """`score` plus per-sample metrics: `acc` (1/0), `has_boxed`, `end_tag_missing`."""
    text = response_text
    tag_missing = False
    if reasoning_end_tag:
        cut = text.rfind(reasoning_end_tag)
        tag_missing = cut < 0
        if not tag_missing:
            text = text[cut + len(reasoning_end_tag):]
    boxed = extract_boxed(text)
    correct = boxed is not None and is_equivalent(boxed, ground_truth)
    score = correct_score if correct else incorrect_score
    if tag_missing:
        score -= missing_end_tag_penalty
    return {"score": float(score), "acc": float(correct), "has_boxed": float(boxed is not None),
            "end_tag_missing": float(tag_missing)}


def math_reward(response_text: str, ground_truth: str, *, reasoning_end_tag: str | None = None,
                missing_end_tag_penalty: float = 0.5, correct_score: float = 1.0, incorrect_score: float = -1.0,
                **extra) -> float:
    """+1 if the last `\\boxed{}` equals `ground_truth`, else -1 (minus the end-tag penalty if configured)."""
    return math_reward_detailed(response_text, ground_truth, reasoning_end_tag=reasoning_end_tag,
                                missing_end_tag_penalty=missing_end_tag_penalty, correct_score=correct_score,
                                incorrect_score=incorrect_score)["score"]
