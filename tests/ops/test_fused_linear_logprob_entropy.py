"""fused_linear_logprob_entropy without tensor parallelism (TP=1): values and gradients of hidden
and weight vs float64, memory bounded by the chunk, validation. Multi-rank: test_tensor_parallel.py."""
from __future__ import annotations

import os

import pytest
import torch

from erc_megatron.ops import fused_linear_logprob_entropy, vocab_parallel_logprob_entropy
from erc_megatron.testing.peak_memory import peak_cpu_bytes
from tests.ops.checks import all_cases, run_fused_case

SEED = int(os.environ.get("ERC_TEST_SEED", "1234"))


def test_tp1_matches_float64_reference_for_every_case():
    for case in all_cases(SEED, tp=1, local=23, shape=(3, 5), hidden=7):
        run_fused_case(case, rank=0, tp_group=None)


def test_same_results_as_the_unfused_op():
    g = torch.Generator().manual_seed(SEED)
    h = torch.randn(4, 9, 16, generator=g, dtype=torch.float64)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    t = torch.randint(0, 45, (4, 9), generator=g)
    fused = fused_linear_logprob_entropy(h, w, t, chunk_size=5, vocab_size=45, temperature=1.3)
    unfused = vocab_parallel_logprob_entropy(h @ w.T, t, vocab_size=45, temperature=1.3)
    for a, b in zip(fused, unfused):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"seed={SEED}")


def test_fused_memory_never_holds_the_logits():
    rows, vocab, hid, chunk = 512, 2048, 32, 16
    full = rows * vocab * 4
    chunk_buf = chunk * vocab * 4
    h = torch.randn(rows, hid, requires_grad=True)
    w = torch.randn(vocab, hid, requires_grad=True)
    t = torch.randint(0, vocab, (rows,))
    per_row = 64 * rows
    (lp, ent), fwd_peak = peak_cpu_bytes(lambda: fused_linear_logprob_entropy(h, w, t, chunk_size=chunk,
                                                                              entropy_grad=True))
    assert fwd_peak <= 2 * chunk_buf + per_row, (fwd_peak, chunk_buf)
    _, bwd_peak = peak_cpu_bytes(lambda: (lp.sum() + ent.sum()).backward())
    grads = (rows + vocab) * hid * 4  # grad_hidden and grad_weight are the outputs
    assert bwd_peak <= grads + 2 * chunk_buf + per_row, (bwd_peak - grads, chunk_buf)
    assert bwd_peak < full / 4
    # the unfused path holds the [rows, vocab] logits, which the probe does see
    _, unfused_peak = peak_cpu_bytes(lambda: vocab_parallel_logprob_entropy(h @ w.T, t, chunk_size=chunk))
    assert unfused_peak >= full


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight=torch.randn(10, 7)), ValueError, "weight: expected"),
    (dict(weight=torch.randn(10, 8, dtype=torch.float64)), TypeError, "dtypes must match"),
    (dict(target=torch.zeros(3, dtype=torch.long)), ValueError, "target: expected shape"),
    (dict(target=torch.zeros(4, 3)), TypeError, "target: expected an integer"),
    (dict(temperature=0), ValueError, "temperature"),
    (dict(chunk_size=-2), ValueError, "chunk_size"),
    (dict(vocab_size=9, target=torch.full((4, 3), 9)), ValueError, r"\[0, 9\)"),
    (dict(backend="triton"), ValueError, "backend"),
])
def test_bad_arguments_are_refused_with_the_field_named(kwargs, error, match):
    args = dict(hidden=torch.randn(4, 3, 8), weight=torch.randn(10, 8), target=torch.zeros(4, 3, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fused_linear_logprob_entropy(**args)
