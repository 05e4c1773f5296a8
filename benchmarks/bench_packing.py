"""Benchmark: padded vs packed (trainer.max_tokens_per_micro_batch) micro-batches on the demo
workload with long-tailed response lengths, and the rollout hand-off from rank 0 before/after.

    python benchmarks/bench_packing.py                       # both parts
    python benchmarks/bench_packing.py --max-response 2048 --max-tokens 4096 --repeats 3
    python benchmarks/bench_packing.py --skip-broadcast      # only the learner part

Learner part (one process, gloo, megatron-core's local layer spec): the demo model's shape
(Qwen2-style, hidden 64, 2 layers, 4 heads / 2 key-value heads, SwiGLU 128, the demo tokenizer's
vocabulary) and the demo recipe's step (16 prompts x 8 samples, 8 prompts per optimizer step), but
responses drawn long-tailed (Pareto, alpha 1.1, capped at --max-response) as in reasoning RL. One
RL learner step = old-policy pass + the ERC updates of every mini-batch, exactly what
train/main.py runs: padded (--micro-batch-size sequences right-padded to the step's longest) and
packed (rows of at most --max-tokens tokens). Reported: real (prompt + response) tokens processed
per second (median over --repeats steps, the two paths alternating, after one warm-up step each),
the tokens the model actually computed (padding included), and the peak extra CPU memory of one
step (measured separately through the profiler, which slows the step).

Broadcast part (4 gloo processes, no model): rank 0 hands a step of --broadcast-prompts x 8
long-tailed samples to every rank, as train/main.py did before (broadcast_object_list of the
pickled Sample lists) and as it does now (train/rollout_share.py: a table broadcast + each
data-parallel rank's token share scattered), for the TP2 x DP2 layout (ranks 2r, 2r+1 = replica r)
and DP4. Median wall time of the slowest rank, CPU time (process_time, all threads) summed over
the 4 ranks, and the bytes each rank receives. On a loaded machine the wall times are mostly
scheduling; the CPU time and the bytes are the steadier figures.
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def long_tailed_step(n_prompts: int, n_samples: int, max_response: int, vocab: int, seed: int):
    """Groups of Samples: prompts of 8..24 tokens, responses Pareto(1.1)-distributed (median about
    40 tokens, a few at the cap), random advantages and rewards."""
    from erc_megatron.rollout.collect import Sample

    rng = random.Random(seed)
    groups = []
    for g in range(n_prompts):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(8, 24))]
        group = []
        for _ in range(n_samples):
            n = min(max_response, int(24 * rng.paretovariate(1.1)))
            resp = [rng.randrange(1, vocab) for _ in range(n)]
            reward = float(rng.random() < 0.5)
            group.append(Sample(prompt, resp, "", "", reward, [-rng.random() for _ in resp], "stop", g,
                                advantage=rng.gauss(0.0, 1.0)))
        groups.append(group)
    return groups


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def learner_part(args) -> None:
    from erc_megatron.algo import PolicyLossConfig
    from erc_megatron.data.demo_tokenizer import build_tokenizer
    from erc_megatron.dist import init_distributed
    from erc_megatron.model.config import ModelConfig, ParallelConfig
    from erc_megatron.testing.peak_memory import peak_cpu_bytes
    from erc_megatron.train.learner import OptimConfig, build_learner
    from erc_megatron.train.minibatch import split_minibatches
    from erc_megatron.train.step import LogitsConfig, old_policy_pass
    from erc_megatron.train.update import update_policy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    vocab = len(build_tokenizer())
    longest = 24 + args.max_response
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      vocab_size=vocab, make_vocab_size_divisible_by=8, add_qkv_bias=True,
                      untie_embeddings_and_output_weights=True, max_position_embeddings=max(longest, args.max_tokens))
    init_distributed(ParallelConfig(seed=7), cfg)
    learner = build_learner(cfg, OptimConfig(lr=1e-5, weight_decay=0.0, clip_grad=1.0))
    loss_cfg = PolicyLossConfig(surrogate="ppo_clip", eps_low=0.2, eps_high=0.28, clip_ratio_c=10.0, erc=True,
                                erc_low=0.95, erc_high=1.05, agg="token-mean")
    logits_cfg = LogitsConfig(temperature=1.0)
    groups = long_tailed_step(args.prompts, 8, args.max_response, vocab, args.seed)
    lengths = [len(s.prompt_ids) + len(s.response_ids) for g in groups for s in g]
    real = sum(lengths)
    print(f"step: {len(lengths)} sequences, {real} real tokens; response lengths median "
          f"{statistics.median(len(s.response_ids) for g in groups for s in g):.0f}, max "
          f"{max(len(s.response_ids) for g in groups for s in g)}; longest sequence {max(lengths)}", flush=True)

    def step(max_tokens):
        mbs = split_minibatches(groups, args.prompts_per_minibatch, 0, 1, args.micro_batch_size, pad_id=0,
                                max_tokens=max_tokens)
        flat = old_policy_pass(learner.model, [mb for m in mbs for mb in m.mine], cfg.vocab_size, logits_cfg)
        i = 0
        for m in mbs:
            mine = flat[i:i + len(m.mine)]
            i += len(m.mine)
            update_policy(learner, mine, m.denominators(loss_cfg.agg, False), loss_cfg, logits_cfg)
        return sum(mb.tokens.numel() for mb in flat), len(flat), tuple(flat[0].tokens.shape)

    paths = {"padded": None, "packed": args.max_tokens}
    computed, rows, shapes = {}, {}, {}
    for name, mt in paths.items():  # warm-up (allocator, first-call costs)
        computed[name], rows[name], shapes[name] = step(mt)
    times = {name: [] for name in paths}
    for r in range(args.repeats):
        for name, mt in paths.items():
            t0 = time.perf_counter()
            step(mt)
            times[name].append(time.perf_counter() - t0)
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in paths), flush=True)
    peak = {name: peak_cpu_bytes(lambda mt=mt: step(mt))[1] for name, mt in paths.items()}

    print(f"\nlearner step (old-policy pass + {args.prompts // args.prompts_per_minibatch} ERC updates), "
          f"demo model shape, {len(lengths)} sequences:")
    print(f"{'path':<8} {'micro-batches':>13} {'shape':>12} {'tokens computed':>16} {'padding':>8} "
          f"{'step s':>8} {'real tok/s':>11} {'peak MiB':>9}")
    tps = {}
    for name in paths:
        t = statistics.median(times[name])
        tps[name] = real / t
        print(f"{name:<8} {rows[name]:>13} {str(list(shapes[name])):>12} {computed[name]:>16} "
              f"{1 - real / computed[name]:>7.0%} {t:>8.2f} {tps[name]:>11.0f} {peak[name] / 2**20:>9.1f}")
    print(f"packed / padded: real tokens/s x{tps['packed'] / tps['padded']:.2f}, peak memory "
          f"x{peak['packed'] / peak['padded']:.2f} (max_tokens_per_micro_batch={args.max_tokens}, "
          f"padded micro_batch_size={args.micro_batch_size})", flush=True)
    dist.destroy_process_group()


def _broadcast_worker(rank, world, port, args, queue):
    from erc_megatron.train.minibatch import plan_minibatches
    from erc_megatron.train.rollout_share import RolloutShare

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    groups = long_tailed_step(args.broadcast_prompts, 8, args.max_response, 50000, args.seed) if rank == 0 else None
    metrics = {"reward/mean": 0.5}
    out = {}
    for layout, dp_of in (("TP2xDP2", lambda r: r // 2), ("DP4", lambda r: r)):
        dp = len({dp_of(r) for r in range(world)})

        def plan(table, dp=dp):
            return plan_minibatches(table, 8, dp, 1, args.max_tokens)

        share = RolloutShare(dp_of(rank), dp, plan)

        def old():
            box = [(groups, metrics)] if rank == 0 else [None]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        def new(share=share):
            return share.share(lambda: (groups, metrics))

        for name, fn in (("before", old), ("after", new)):
            fn()  # warm-up
            ts, cpu = [], []
            for _ in range(args.repeats_broadcast):
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                got = fn()
                ts.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            if name == "before":
                nbytes = len(pickle.dumps(got))
            else:
                s, _ = got
                nbytes = s.table.prompt_lens.__len__() * 4 * 8 + sum(
                    len(x.prompt_ids) + 2 * len(x.response_ids) for x in s.samples.values()) * 4
            out[(layout, name)] = (statistics.median(ts), nbytes, statistics.median(cpu))
    queue.put((rank, out))
    dist.destroy_process_group()


def broadcast_part(args) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_broadcast_worker, args=(r, 4, port, args, queue)) for r in range(4)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    print(f"\nrollout hand-off from rank 0, {args.broadcast_prompts} prompts x 8 samples, 4 ranks "
          f"(median of {args.repeats_broadcast}, slowest rank):")
    print(f"{'layout':<8} {'path':<8} {'wall s':>8} {'CPU s, 4 ranks':>15} {'bytes to a rank (max)':>22}")
    for layout in ("TP2xDP2", "DP4"):
        row, rcpu = {}, {}
        for name in ("before", "after"):
            t = max(results[r][(layout, name)][0] for r in results)
            b = max(results[r][(layout, name)][1] for r in results if r != 0)
            c = sum(results[r][(layout, name)][2] for r in results)
            row[name], rcpu[name] = t, c
            label = "pickled Sample lists" if name == "before" else "compact share"
            print(f"{layout:<8} {name:<8} {t:>8.4f} {c:>15.4f} {b:>22}   {label}")
        print(f"{layout:<8} after / before: wall x{row['after'] / row['before']:.3f}, CPU "
              f"x{rcpu['after'] / rcpu['before']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (demo recipe: 16)")
    p.add_argument("--prompts-per-minibatch", type=int, default=8)
    p.add_argument("--max-response", type=int, default=1024, help="response length cap")
    p.add_argument("--micro-batch-size", type=int, default=8, help="padded path's sequences per micro-batch")
    p.add_argument("--max-tokens", type=int, default=2048, help="packed path's max_tokens_per_micro_batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--broadcast-prompts", type=int, default=128)
    p.add_argument("--repeats-broadcast", type=int, default=5)
    p.add_argument("--skip-learner", action="store_true")
    p.add_argument("--skip-broadcast", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    if not args.skip_broadcast:
        broadcast_part(args)
    if not args.skip_learner:
        learner_part(args)


if __name__ == "__main__":
    main()
