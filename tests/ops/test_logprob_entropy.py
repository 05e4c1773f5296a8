"""vocab_parallel_logprob_entropy without tensor parallelism (TP=1) and its local contracts:
validation, inputs untouched, nothing saved for a gradient-free entropy, memory bounded by chunk.
Multi-rank checks live in test_tensor_parallel.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from erc_megatron.ops import vocab_parallel_logprob_entropy
from erc_megatron.testing.peak_memory import peak_cpu_bytes
from tests.ops.checks import all_cases, run_logits_case

SEED = int(os.environ.get("ERC_TEST_SEED", "1234"))


def test_tp1_matches_float64_reference_for_every_case():
    for case in all_cases(SEED, tp=1, local=29, shape=(3, 7)):
        run_logits_case(case, rank=0, tp_group=None)


def test_2d_and_1d_rows_and_chunk_independence():
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(10, 33, generator=g, dtype=torch.float64)
    t = torch.randint(0, 33, (10,), generator=g)
    outs = [vocab_parallel_logprob_entropy(x, t, chunk_size=c) for c in (None, 1, 3, 10, 100)]
    for lp, h in outs[1:]:
        torch.testing.assert_close(lp, outs[0][0], rtol=1e-14, atol=1e-14, msg=f"seed={SEED}")
        torch.testing.assert_close(h, outs[0][1], rtol=1e-14, atol=1e-14, msg=f"seed={SEED}")
    lp1, h1 = vocab_parallel_logprob_entropy(x[4], t[4])  # a single row: logits [V], target []
    assert lp1.shape == h1.shape == ()
    torch.testing.assert_close(lp1, outs[0][0][4], rtol=1e-14, atol=1e-14)


def test_entropy_without_grad_saves_nothing_for_it():
    rows, vocab = 12, 40
    x = torch.randn(rows, vocab, requires_grad=True)
    t = torch.randint(0, vocab, (rows,))
    lp, h = vocab_parallel_logprob_entropy(x, t, entropy_grad=False)
    assert lp.requires_grad and not h.requires_grad and h.grad_fn is None
    saved = lp.grad_fn.saved_tensors
    big = [s for s in saved if s.numel() >= rows * vocab]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), "the logits are saved by reference, nothing else big"
    assert len(saved) == 3 and all(s.numel() == rows for s in saved if s is not big[0] and s.dtype.is_floating_point)

    lp2, h2 = vocab_parallel_logprob_entropy(x, t, entropy_grad=True)
    assert h2.requires_grad
    saved2 = lp2.grad_fn.saved_tensors
    assert len(saved2) == len(saved) + 1  # only a per-row E_p[z] is added for the entropy gradient
    assert sum(s.numel() >= rows * vocab for s in saved2) == 1


def test_logits_never_modified_and_bf16_grad_dtype():
    x = torch.randn(6, 50, dtype=torch.bfloat16, requires_grad=True)
    before = x.detach().clone()
    lp, h = vocab_parallel_logprob_entropy(x, torch.randint(0, 50, (6,)), entropy_grad=True, temperature=0.5)
    (lp.sum() + h.sum()).backward()
    assert torch.equal(x.detach(), before)
    assert lp.dtype == h.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_chunked_memory_is_bounded_by_the_chunk():
    rows, vocab, chunk = 512, 2048, 16
    full = rows * vocab * 4
    chunk_buf = chunk * vocab * 4
    x = torch.randn(rows, vocab, requires_grad=True)
    t = torch.randint(0, vocab, (rows,))
    # the probe must see a [rows, vocab] temporary where one exists
    _, naive = peak_cpu_bytes(lambda: torch.log_softmax(x.detach(), -1))
    assert naive >= full
    for entropy_grad in (False, True):
        (lp, h), fwd_peak = peak_cpu_bytes(lambda: vocab_parallel_logprob_entropy(x, t, chunk_size=chunk,
                                                                                  entropy_grad=entropy_grad))
        per_row = 64 * rows  # a few float64 / int64 per-row vectors
        assert fwd_peak <= 2 * chunk_buf + per_row, (fwd_peak, chunk_buf)
        _, bwd_peak = peak_cpu_bytes(lambda: (lp.sum() + (h.sum() if entropy_grad else 0)).backward())
        # the returned gradient itself, plus one chunk buffer when the entropy has a gradient
        assert bwd_peak <= full + chunk_buf + per_row, (bwd_peak - full, chunk_buf)
        x.grad = None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target=torch.zeros(4, 3, dtype=torch.long)), ValueError, "target: expected shape"),
    (dict(target=torch.zeros(4, 2)), TypeError, "target: expected an integer"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(target=torch.full((4, 2), 10)), ValueError, r"target: token ids must lie in \[0, 10\)"),
    (dict(target=torch.full((4, 2), -1)), ValueError, "target: token ids"),
    (dict(vocab_size=8, target=torch.full((4, 2), 8)), ValueError, r"\[0, 8\)"),
    (dict(vocab_size=11), ValueError, "vocab_size"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
])
def test_bad_arguments_are_refused_with_the_field_named(kwargs, error, match):
    args = dict(logits=torch.randn(4, 2, 10), target=torch.zeros(4, 2, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        vocab_parallel_logprob_entropy(**args)


def test_import_does_not_load_megatron():
    code = "import sys, erc_megatron.ops, erc_megatron.comm; assert not any(m.startswith('megatron') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
