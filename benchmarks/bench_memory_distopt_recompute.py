"""Benchmark: per-rank optimizer-state memory with and without the distributed optimizer (DP=2, DP=4),
and activation memory with and without recomputation and sequence parallelism (TP=2), on gloo (CPU).

    python benchmarks/bench_memory_distopt_recompute.py            # spawns its own ranks (2, then 4)
    python benchmarks/bench_memory_distopt_recompute.py --layers 8 --hidden 256 --seq 512

Optimizer state (`parallel.use_distributed_optimizer`), a dense model at TP1xPP1 over 2 and over 4
data-parallel ranks, float32 and bfloat16: after one real forward/backward/optimizer step, the bytes
each rank's optimizer holds (Adam's exp_avg / exp_avg_sq / step, plus the fp32 master weights of a
bf16 model), counted from the wrapped torch optimizer's tensors, and the peak extra CPU memory the
first `optimizer.step()` allocated (the profiler's allocator events; Adam allocates its state there).

Activations (`model.recompute_*`, `parallel.sequence_parallel`), TP=2 x DP=1 on 2 ranks: bytes a
forward pass (model + a scalar loss on the logits) keeps alive for backward besides its output,
the peak of forward+backward, and the median forward+backward time (recomputation costs time).
Every figure is per rank (rank 0; the ranks agree to within a few KiB).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.distributed import run_distributed  # noqa: E402

MiB = 2 ** 20
RECOMPUTE = [("none", (None, None, None), False), ("selective", ("selective", None, None), False),
             ("full uniform 1", ("full", "uniform", 1), False), ("full block all", ("full", "block", None), False),
             ("sequence parallel", (None, None, None), True),
             ("SP + selective", ("selective", None, None), True), ("SP + full uniform 1", ("full", "uniform", 1), True)]


def _model_cfg(args, dtype="float32", recompute=(None, None, None)):
    from erc_megatron.model.config import ModelConfig

    granularity, method, layers = recompute
    if method == "block" and layers is None:
        layers = args.layers
    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                       num_attention_heads=args.heads, vocab_size=args.vocab, make_vocab_size_divisible_by=128,
                       max_position_embeddings=args.seq, params_dtype=dtype, recompute_granularity=granularity,
                       recompute_method=method, recompute_num_layers=layers)


def _batch(args, seed=0):
    import torch

    from erc_megatron.train.batch import MicroBatch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=g)
    return MicroBatch(tokens=tokens, labels=tokens, loss_mask=torch.ones(tokens.shape))


def _loss(logits, mb):
    return logits.float().pow(2).mean(), {}


def _optimizer_bytes(learner) -> int:
    from erc_megatron.patches.megatron_adam_state import _torch_optimizers

    total = 0
    model_dtype = next(learner.unwrapped.parameters()).dtype
    for opt in _torch_optimizers(learner.optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.dtype != model_dtype:  # fp32 master copies of a bf16 model (whole or sliced)
                    total += p.numel() * p.element_size()
        for state in opt.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if hasattr(t, "numel"))
    return total


def _optimizer_worker(rank, world_size, args):
    import torch

    from megatron.core import parallel_state as ps

    from erc_megatron.dist import init_distributed
    from erc_megatron.model.config import ParallelConfig
    from erc_megatron.testing.peak_memory import peak_cpu_bytes
    from erc_megatron.train.learner import OptimConfig, build_learner
    from erc_megatron.train.step import forward_backward, zero_grads

    rows = []
    for dtype in ("float32", "bfloat16"):
        for distopt in (False, True):
            cfg = _model_cfg(args, dtype)
            parallel = ParallelConfig(use_distributed_optimizer=distopt)
            init_distributed(parallel, cfg)
            learner = build_learner(cfg, OptimConfig(lr=1e-4), parallel)
            n_params = sum(p.numel() for p in learner.unwrapped.parameters())
            zero_grads(learner)
            forward_backward(learner.model, [_batch(args, rank)], _loss)
            _, step_peak = peak_cpu_bytes(learner.optimizer.step)
            rows.append((dtype, distopt, ps.get_data_parallel_world_size(), n_params, _optimizer_bytes(learner),
                         step_peak))
            del learner
            ps.destroy_model_parallel()
            torch.manual_seed(0)
    return rows


def _activation_worker(rank, world_size, args):
    from megatron.core import parallel_state as ps

    from erc_megatron.dist import init_distributed
    from erc_megatron.model.config import ParallelConfig
    from erc_megatron.testing.peak_memory import peak_and_held_cpu_bytes
    from erc_megatron.train.learner import OptimConfig, build_learner

    rows = []
    mb = _batch(args)
    for name, recompute, sp in RECOMPUTE:
        cfg = _model_cfg(args, "float32", recompute)
        parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sp)
        init_distributed(parallel, cfg)
        learner = build_learner(cfg, OptimConfig(lr=1e-4), parallel)
        model = learner.model

        def forward(model=model):
            return _loss(model(mb.tokens, mb.position_ids, attention_mask=None), mb)[0]

        def forward_backward(forward=forward):
            forward().backward()

        loss, _, held = peak_and_held_cpu_bytes(forward)
        loss.backward()
        model.zero_grad_buffer()
        _, peak, _ = peak_and_held_cpu_bytes(forward_backward)
        model.zero_grad_buffer()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            forward_backward()
            times.append(time.perf_counter() - start)
            model.zero_grad_buffer()
        rows.append((name, held, peak, statistics.median(times)))
        del learner, model
        ps.destroy_model_parallel()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    print(f"model: {args.layers} layers, hidden {args.hidden}, ffn {4 * args.hidden}, {args.heads} heads, "
          f"vocab {args.vocab}; optimizer at TP1xPP1; activations at TP2, micro-batch {args.micro_batch} x "
          f"{args.seq} tokens", flush=True)
    print("\n== optimizer state per rank (after one step) ==")
    print(f"{'dtype':<9} {'DP':>2} {'params/rank':>11} | {'plain MiB':>9} {'distopt MiB':>11} {'ratio':>6} | "
          f"{'step peak plain':>15} {'distopt':>8} {'ratio':>6}")
    for world in (2, 4):
        print(f"  (launching {world} ranks)", flush=True)
        rows = run_distributed(_optimizer_worker, world, args=(args,), timeout=1800)[0]
        for dtype in ("float32", "bfloat16"):
            plain = next(r for r in rows if r[0] == dtype and not r[1])
            dist_ = next(r for r in rows if r[0] == dtype and r[1])
            print(f"{dtype:<9} {plain[2]:>2} {plain[3]:>11,} | {plain[4] / MiB:>9.2f} {dist_[4] / MiB:>11.2f} "
                  f"{dist_[4] / plain[4]:>6.3f} | {plain[5] / MiB:>15.2f} {dist_[5] / MiB:>8.2f} "
                  f"{dist_[5] / max(plain[5], 1):>6.3f}", flush=True)

    print("\n== activations per rank, TP=2 (forward keeps / forward+backward peak / fwd+bwd time) ==", flush=True)
    rows = run_distributed(_activation_worker, 2, args=(args,), timeout=1800)[0]
    base = rows[0]
    print(f"{'variant':<20} {'kept MiB':>9} {'vs none':>7} | {'peak MiB':>9} {'vs none':>7} | {'time s':>7} "
          f"{'vs none':>7}")
    for name, held, peak, seconds in rows:
        print(f"{name:<20} {held / MiB:>9.1f} {held / base[1]:>7.3f} | {peak / MiB:>9.1f} {peak / base[2]:>7.3f} | "
              f"{seconds:>7.3f} {seconds / base[3]:>7.2f}")


if __name__ == "__main__":
    main()
