"""Float64 references and the checks shared by the single-process and the multi-rank op tests.

Every case is built from a seed, identically on every rank: the full-vocabulary logits (or the
full output weight) exist on each rank, each rank feeds its own shard to the op and compares with
a plain-torch float64 reference on the full tensor (log_softmax etc.).

Tolerances, relative to the largest reference magnitude unless said otherwise:
- float64 inputs: 1e-6 per element (the op's own arithmetic error is ~1e-15);
- float32 inputs: 1e-6 (outputs and gradients). Fused cases use hidden and weight values on a
  1/4 grid so that hidden @ weight.T is exact in float32 (torch's matmul rounding is not the op's
  error, and the entropy gradient amplifies it); their hidden / weight gradients are float32 sums
  of products, measured against the largest sum of product magnitudes (`check_matmul_grad`);
- bf16 inputs: outputs (float32) as float32; gradients are returned in bf16, so per element one
  bf16 ulp (2^-8 relative) of the float64 reference, plus 1e-6; the fused op's hidden gradient is
  summed over TP ranks in bf16 like megatron's output layer: (tp + 1) bf16 half-ulps of the sum
  of the per-rank partial magnitudes.
"""
from __future__ import annotations

import dataclasses

import torch

from erc_megatron.comm import record_collectives
from erc_megatron.ops import fused_linear_logprob_entropy, vocab_parallel_logprob_entropy

BF16_ULP = 2.0 ** -8


@dataclasses.dataclass
class Case:
    seed: int
    tp: int
    local: int  # shard size V/tp
    vocab_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    temperature: float
    chunk_size: int | None
    entropy_grad: bool
    hidden: int = 0  # > 0: fused linear case

    def __str__(self) -> str:
        return (f"seed={self.seed} tp={self.tp} V/tp={self.local} vocab_size={self.vocab_size} shape={self.shape} "
                f"dtype={self.dtype} T={self.temperature} chunk={self.chunk_size} entropy_grad={self.entropy_grad}"
                + (f" hidden={self.hidden}" if self.hidden else ""))


def make_inputs(case: Case):
    """Full float64 tensors (rounded through case.dtype) and upstream gradients; same on all ranks."""
    g = torch.Generator().manual_seed(case.seed)
    padded = case.tp * case.local
    target = torch.randint(0, case.vocab_size, case.shape, generator=g)
    flat = target.view(-1)
    for r in range(case.tp):  # a target in every shard that has real entries
        valid = min(case.local, case.vocab_size - r * case.local)
        if valid > 0 and r < flat.numel():
            flat[r] = r * case.local + int(torch.randint(0, valid, (1,), generator=g))
    g_logp = torch.randn(case.shape, generator=g, dtype=torch.float64)
    g_ent = torch.randn(case.shape, generator=g, dtype=torch.float64)
    if case.hidden:
        if case.dtype == torch.float64:
            hidden = torch.randn(*case.shape, case.hidden, generator=g, dtype=torch.float64)
            weight = torch.randn(padded, case.hidden, generator=g, dtype=torch.float64) * 2
        else:  # multiples of 1/4 in [-2, 2]: every product and sum of hidden @ weight.T is exact in float32
            hidden = torch.randint(-8, 9, (*case.shape, case.hidden), generator=g).double() / 4
            weight = torch.randint(-8, 9, (padded, case.hidden), generator=g).double() / 4
        weight[case.vocab_size:] = 10.0  # padding rows: huge logits if they were counted
        return hidden.to(case.dtype).double(), weight.to(case.dtype).double(), target, g_logp, g_ent
    logits = torch.randn(*case.shape, padded, generator=g, dtype=torch.float64) * 3 + 1
    logits[..., case.vocab_size:] = 100.0  # padding: would dominate max, sums and gradients if counted
    return logits.to(case.dtype).double(), target, g_logp, g_ent


def reference(logits, target, temperature, vocab_size, g_logp, g_ent, entropy_grad):
    """Plain float64 torch on the full logits: (logp, entropy, grad wrt the full logits)."""
    x = logits.detach().clone().requires_grad_()
    z = x[..., :vocab_size] / temperature
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = torch.logsumexp(z, dim=-1) - (log_p.exp() * z).sum(-1)
    loss = (logp * g_logp).sum() + ((entropy * g_ent).sum() if entropy_grad else 0)
    loss.backward()
    return logp.detach(), entropy.detach(), x.grad


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (got.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_rel(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float, case: Case) -> None:
    err = rel_err(got, ref)
    assert err <= tol, f"{name}: max error {err:.3g} of max |ref| > {tol:.3g} [{case}]"


def assert_elementwise(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float, bound_extra, case: Case):
    """|got - ref| <= rtol * |ref| + bound_extra (tensor or float) + 1e-6 * max|ref|, per element."""
    diff = (got.double() - ref).abs()
    bound = rtol * ref.abs() + bound_extra + 1e-6 * ref.abs().max()
    bad = diff > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} elements out of bound, worst diff {diff[bad].max().item():.3g} "
                           f"[{case}]")


def check_outputs(logp, ent, ref_logp, ref_ent, case: Case) -> None:
    assert logp.dtype == ent.dtype == (torch.float64 if case.dtype == torch.float64 else torch.float32)
    assert logp.shape == ent.shape == case.shape
    if case.dtype == torch.float64:
        assert_elementwise("logp", logp, ref_logp, 1e-6, 0.0, case)
        assert_elementwise("entropy", ent, ref_ent, 1e-6, 0.0, case)
    else:
        assert_rel("logp", logp, ref_logp, 1e-6, case)
        assert_rel("entropy", ent, ref_ent, 1e-6, case)


def check_grad(name: str, got: torch.Tensor, ref: torch.Tensor, case: Case, extra=0.0) -> None:
    if case.dtype == torch.float64:
        assert_elementwise(name, got, ref, 1e-6, 0.0, case)
    elif case.dtype == torch.bfloat16:
        assert got.dtype == torch.bfloat16
        assert_elementwise(name, got, ref, BF16_ULP, extra, case)
    else:
        assert_rel(name, got, ref, 1e-6, case)


def check_matmul_grad(name: str, got: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor, n_terms: int,
                      case: Case, extra=0.0) -> None:
    """A gradient that is a float32 sum of `n_terms` products (grad_weight = G^T h, grad_hidden = G W).

    Its float32 error scales with the sum of the magnitudes of the products (`terms`, e.g.
    |G|^T |h|), not with the result, which may cancel: (1e-6 + n_terms * 2^-24) of max(terms),
    1e-6 for the op's gradient of the logits and the standard bound of a float32 sum.
    """
    if case.dtype == torch.float64:
        assert_elementwise(name, got, ref, 1e-6, 0.0, case)
        return
    bound = (1e-6 + n_terms * 2.0 ** -24) * terms.max().item()
    if case.dtype == torch.bfloat16:
        assert got.dtype == torch.bfloat16
        assert_elementwise(name, got, ref, BF16_ULP, extra + bound, case)
    else:
        err = (got.double() - ref).abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} [{case}]"


def run_logits_case(case: Case, rank: int, tp_group) -> None:
    """One logits-op case on this rank: values, gradients, padding, collectives, input untouched."""
    full, target, g_logp, g_ent = make_inputs(case)
    lo, hi = rank * case.local, (rank + 1) * case.local
    shard = full[..., lo:hi].to(case.dtype, copy=True).contiguous().requires_grad_()
    before = shard.detach().clone()
    with record_collectives() as fwd:
        logp, ent = vocab_parallel_logprob_entropy(shard, target, tp_group, temperature=case.temperature,
                                                   chunk_size=case.chunk_size, entropy_grad=case.entropy_grad,
                                                   vocab_size=case.vocab_size)
    assert ent.requires_grad == case.entropy_grad, case
    loss = (logp * g_logp.to(logp.dtype)).sum()
    if case.entropy_grad:
        loss = loss + (ent * g_ent.to(ent.dtype)).sum()
    with record_collectives() as bwd:
        loss.backward()
    expect = 0 if case.tp == 1 else 1
    assert fwd.count() == expect and fwd.count(group=tp_group) == expect, (fwd.format_summary(), case)
    assert bwd.count() == 0, (bwd.format_summary(), case)
    assert torch.equal(shard.detach(), before), f"logits modified [{case}]"

    ref_logp, ref_ent, ref_grad = reference(full, target, case.temperature, case.vocab_size, g_logp, g_ent,
                                            case.entropy_grad)
    check_outputs(logp, ent, ref_logp, ref_ent, case)
    assert shard.grad.dtype == case.dtype and shard.grad.shape == shard.shape
    check_grad("grad logits", shard.grad, ref_grad[..., lo:hi], case)
    pad_from = max(0, min(case.local, case.vocab_size - lo))
    assert torch.all(shard.grad[..., pad_from:] == 0), f"gradient of padded entries not 0 [{case}]"


def run_fused_case(case: Case, rank: int, tp_group) -> None:
    """One fused-linear case on this rank: values, hidden and weight gradients, collectives."""
    hidden64, weight64, target, g_logp, g_ent = make_inputs(case)
    lo, hi = rank * case.local, (rank + 1) * case.local
    hidden = hidden64.to(case.dtype, copy=True).requires_grad_()
    weight = weight64[lo:hi].to(case.dtype, copy=True).contiguous().requires_grad_()
    with record_collectives() as fwd:
        logp, ent = fused_linear_logprob_entropy(hidden, weight, target, tp_group, temperature=case.temperature,
                                                 chunk_size=case.chunk_size, entropy_grad=case.entropy_grad,
                                                 vocab_size=case.vocab_size)
    assert ent.requires_grad == case.entropy_grad, case
    loss = (logp * g_logp.to(logp.dtype)).sum()
    if case.entropy_grad:
        loss = loss + (ent * g_ent.to(ent.dtype)).sum()
    with record_collectives() as bwd:
        loss.backward()
    expect = 0 if case.tp == 1 else 1
    assert fwd.count() == expect and fwd.count(group=tp_group) == expect, (fwd.format_summary(), case)
    assert bwd.count() == expect and bwd.count("all_reduce", group=tp_group) == expect, (bwd.format_summary(), case)

    h_ref = hidden64.clone().requires_grad_()
    w_ref = weight64.clone().requires_grad_()
    logits = h_ref @ w_ref.T
    ref_logp, ref_ent, ref_glogits = reference(logits.detach(), target, case.temperature, case.vocab_size,
                                               g_logp, g_ent, case.entropy_grad)
    logits.backward(ref_glogits)
    check_outputs(logp, ent, ref_logp, ref_ent, case)
    g_flat = ref_glogits.reshape(-1, ref_glogits.shape[-1])
    terms_w = g_flat.abs().T @ hidden64.reshape(-1, case.hidden).abs()
    check_matmul_grad("grad weight", weight.grad, w_ref.grad[lo:hi], terms_w[lo:hi], g_flat.shape[0], case)
    # hidden's gradient is a sum over TP ranks of per-shard parts, reduced in hidden's dtype
    partials = sum((ref_glogits[..., r * case.local:(r + 1) * case.local] @ weight64[r * case.local:(r + 1) * case.local]).abs()
                   for r in range(case.tp))
    extra = (case.tp + 1) * BF16_ULP / 2 * partials if case.dtype == torch.bfloat16 else 0.0
    check_matmul_grad("grad hidden", hidden.grad, h_ref.grad, ref_glogits.abs() @ weight64.abs(),
                      case.local + case.tp, case, extra=extra)
    pad_from = max(0, min(case.local, case.vocab_size - lo))
    assert torch.all(weight.grad[pad_from:] == 0), f"gradient of padded weight rows not 0 [{case}]"


def all_cases(seed: int, tp: int, local: int, shape: tuple[int, ...], hidden: int = 0) -> list[Case]:
    """dtype x entropy_grad x chunk x temperature x padding (none / partial / a whole shard)."""
    paddings = [tp * local, tp * local - 2]
    if tp > 1:
        paddings.append((tp - 1) * local - 2)  # last shard all padding, the one before partly
    cases = []
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for entropy_grad in (False, True):
            for chunk in (None, 4):
                for temperature in (1.0, 0.7):
                    for vocab_size in paddings:
                        cases.append(Case(seed + len(cases), tp, local, vocab_size, shape, dtype, temperature,
                                          chunk, entropy_grad, hidden))
    return cases
