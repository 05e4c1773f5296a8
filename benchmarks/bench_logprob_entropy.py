"""Benchmark: vocab-parallel log-prob + entropy, our op vs the common way, on gloo (CPU).

    python benchmarks/bench_logprob_entropy.py                # spawns --tp processes itself
    python benchmarks/bench_logprob_entropy.py --tokens 2048 --vocab 65536 --repeats 3

The common way (verl's Megatron path): entropy with three all-reduces (max, sum-exp, sum p*z; the
softmax kept for backward) plus megatron-core's `tensor_parallel.vocab_parallel_cross_entropy` on a
CLONE of the logits (it writes into its input), log-prob = -loss. Both get the same logits, targets
and upstream gradients; the loss is sum(g_l * logp + g_h * entropy) (scenario "both grads") or
sum(g_l * logp) with the entropy only computed (scenario "entropy no grad", ERC's gate).
megatron-core 0.16.1's vocab_parallel_cross_entropy runs on CPU/gloo as is (after
`parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)`); no CPU fix was needed.

The fused-linear rows compare, at --hidden and --fused-tokens, the output layer the megatron way
(copy_to_tensor_model_parallel_region, i.e. an all-reduce of grad_hidden in backward, then
hidden @ W_shard.T) followed by the baseline or by our op, with `fused_linear_logprob_entropy`.

Per method: collectives in forward / backward (from erc_megatron.comm.record_collectives), peak
extra memory (bytes allocated above the inputs during forward+backward, from the CPU allocator via
the profiler; includes the returned logits gradient), and the median forward+backward wall time
(slowest rank per repeat, after warm-up), plus the median CPU time of the slowest rank (steadier
than wall time on a shared machine). Rank 0 prints the table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from erc_megatron.comm import record_collectives  # noqa: E402
from erc_megatron.ops import fused_linear_logprob_entropy, vocab_parallel_logprob_entropy  # noqa: E402
from erc_megatron.testing.peak_memory import peak_cpu_bytes  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class _BaselineEntropy(torch.autograd.Function):
    """Entropy the common way: 3 all-reduces, the [T, V/tp] softmax saved for backward."""

    @staticmethod
    def forward(ctx, logits, group):
        z = logits.float()
        m = z.amax(dim=-1, keepdim=True)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = (z - m).exp_()
        s = e.sum(dim=-1, keepdim=True)
        dist.all_reduce(s, group=group)
        p = e.div_(s)
        pz = (p * z).sum(dim=-1, keepdim=True)
        dist.all_reduce(pz, group=group)
        ctx.save_for_backward(z, p, pz)
        return (m + s.log() - pz).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        z, p, pz = ctx.saved_tensors
        return (grad.unsqueeze(-1) * p * (pz - z)).to(z.dtype), None  # dH/dz = -p (z - E[z])


def baseline(logits, target, group, both_grads):
    from megatron.core import tensor_parallel  # noqa: PLC0415

    logp = -tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), target)
    return logp, _BaselineEntropy.apply(logits, group)


def op(chunk_size=None):
    def run(logits, target, group, both_grads):
        return vocab_parallel_logprob_entropy(logits, target, group, chunk_size=chunk_size, entropy_grad=both_grads)
    return run


def measure(name, make_inputs, forward, loss_fn, args, group, repeats=None):
    """Collectives, peak memory and median time of forward + backward of one method."""
    inputs = make_inputs()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        out = forward(*inputs)
        loss_fn(out).backward()

    fwd_bwd()  # warm-up (and the first page faults)
    with record_collectives() as rec_f:
        out = forward(*inputs)
    with record_collectives() as rec_b:
        loss_fn(out).backward()
    del out
    for t in leaves:
        t.grad = None
    _, peak = peak_cpu_bytes(fwd_bwd)
    times = []
    for _ in range(repeats or args.repeats):
        dist.barrier(group)
        t0, c0 = time.perf_counter(), time.process_time()
        fwd_bwd()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    for t in leaves:
        t.grad = None
    return {"name": name, "fwd": rec_f.count(), "bwd": rec_b.count(), "peak": peak,
            "time": statistics.median(slowest[:, 0].tolist()), "cpu": statistics.median(slowest[:, 1].tolist())}


def _worker(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        from megatron.core import parallel_state  # noqa: PLC0415

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
        group = parallel_state.get_tensor_model_parallel_group()
        rows = run_all(rank, group, args)
        if rank == 0:
            print_table(rows, args)
        parallel_state.destroy_model_parallel()
    finally:
        dist.destroy_process_group()


def run_all(rank, group, args):
    dtype = DTYPES[args.dtype]
    local = args.vocab // args.tp
    gen = torch.Generator().manual_seed(1234 + rank)
    tgen = torch.Generator().manual_seed(99)  # targets and upstream grads identical on all ranks
    target = torch.randint(0, args.vocab, (args.tokens,), generator=tgen)
    g_l = torch.randn(args.tokens, generator=tgen)
    g_h = torch.randn(args.tokens, generator=tgen)

    def logits_inputs():
        x = (torch.randn(args.tokens, local, generator=gen) * 2).to(dtype).requires_grad_()
        return (x, target, group)

    rows = []
    for scenario, both in (("both grads", True), ("entropy no grad", False)):
        def loss(out, both=both):
            logp, ent = out
            return (logp * g_l).sum() + ((ent * g_h).sum() if both else 0)
        methods = [("baseline: 3 all-reduce entropy + megatron CE", baseline),
                   ("op", op()), (f"op chunk_size={args.chunk}", op(args.chunk))]
        for name, fn in methods:
            r = measure(name, logits_inputs, lambda x, t, g, fn=fn, both=both: fn(x, t, g, both), loss, args, group)
            r["scenario"] = scenario
            rows.append(r)
            if rank == 0:
                print(f"  measured {scenario} / {name}: {r['time']:.3f} s", flush=True)

    if args.hidden > 0:
        ftok = args.fused_tokens or args.tokens
        hgen = torch.Generator().manual_seed(7)  # hidden replicated on the TP ranks
        fg_l, fg_h, ftarget = g_l[:ftok], g_h[:ftok], target[:ftok]

        def fused_inputs():
            h = (torch.randn(ftok, args.hidden, generator=hgen) / args.hidden ** 0.5).to(dtype).requires_grad_()
            w = torch.randn(local, args.hidden, generator=gen).to(dtype).requires_grad_()
            return (h, w, ftarget, group)

        def floss(out):
            return (out[0] * fg_l).sum() + (out[1] * fg_h).sum()

        def output_layer(h, w, g):
            # megatron's ColumnParallelLinear: identity forward, all-reduce of grad_hidden in backward
            from megatron.core import tensor_parallel  # noqa: PLC0415

            return tensor_parallel.copy_to_tensor_model_parallel_region(h, group=g) @ w.T

        def unfused(h, w, t, g):
            return vocab_parallel_logprob_entropy(output_layer(h, w, g), t, g, entropy_grad=True)

        def unfused_baseline(h, w, t, g):
            return baseline(output_layer(h, w, g), t, g, True)

        def fused(h, w, t, g):
            return fused_linear_logprob_entropy(h, w, t, g, chunk_size=args.chunk, entropy_grad=True)

        scen = f"linear h={args.hidden} T={ftok}"
        for name, fn in (("unfused: linear + baseline", unfused_baseline), ("unfused: linear + op", unfused),
                         (f"fused linear chunk_size={args.chunk}", fused)):
            r = measure(name, fused_inputs, fn, floss, args, group, repeats=args.fused_repeats)
            r["scenario"] = scen
            rows.append(r)
            if rank == 0:
                print(f"  measured {scen} / {name}: {r['time']:.3f} s", flush=True)
    return rows


def print_table(rows, args):
    _print_rows(rows, args)
    print("\nop vs the common way:")
    print("\n".join(verdict(rows)))


def _print_rows(rows, args):
    print(f"\nTP={args.tp} gloo, tokens={args.tokens}, vocab={args.vocab} (V/tp={args.vocab // args.tp}), "
          f"dtype={args.dtype}, repeats={args.repeats}, threads/rank={args.threads}")
    head = (f"{'scenario':<22} {'method':<46} {'coll fwd':>8} {'coll bwd':>8} {'peak MiB':>9} {'wall s':>8} "
            f"{'cpu s':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['scenario']:<22} {r['name']:<46} {r['fwd']:>8} {r['bwd']:>8} {r['peak'] / 2**20:>9.1f} "
              f"{r['time']:>8.3f} {r['cpu']:>8.3f}")
    print("\nratios first method / each other method of the same scenario (collectives, peak memory, wall and CPU "
          "time; > 1 means the other method is better):")
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    for s in scenarios:
        group_rows = [r for r in rows if r["scenario"] == s]
        base = group_rows[0]
        for r in group_rows[1:]:
            coll = (base["fwd"] + base["bwd"]) / max(r["fwd"] + r["bwd"], 1)
            print(f"  {s:<22} {base['name'][:26]:<26} / {r['name']:<36} collectives x{coll:.1f}  "
                  f"memory x{base['peak'] / max(r['peak'], 1):.2f}  wall x{base['time'] / r['time']:.2f}  "
                  f"cpu x{base['cpu'] / r['cpu']:.2f}")


def verdict(rows):
    """Does the op beat the common way on collectives, peak memory and time in each logits scenario?"""
    lines = []
    for s in dict.fromkeys(r["scenario"] for r in rows):
        base = next(r for r in rows if r["scenario"] == s)
        if not base["name"].startswith("baseline"):
            continue
        for r in rows:
            if r["scenario"] == s and r["name"].startswith("op"):
                wins = {"collectives": r["fwd"] + r["bwd"] < base["fwd"] + base["bwd"],
                        "memory": r["peak"] < base["peak"], "time": r["time"] < base["time"]}
                lines.append(f"  {s} / {r['name']}: " + ", ".join(f"{k} {'WIN' if v else 'LOSS'}" for k, v in wins.items()))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768, help="global vocabulary (divisible by --tp)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--chunk", type=int, default=256, help="chunk_size for the chunked and fused variants")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the fused-linear comparison (0: skip)")
    p.add_argument("--fused-tokens", type=int, default=1024,
                   help="tokens of the fused comparison (0: --tokens); its matmuls dominate on CPU")
    p.add_argument("--fused-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args(argv)
    if args.vocab % args.tp:
        p.error(f"--vocab {args.vocab} must be divisible by --tp {args.tp}")
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(args.tp, port, args), nprocs=args.tp, start_method="spawn")


if __name__ == "__main__":
    main()
