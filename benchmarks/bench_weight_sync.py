"""Benchmark: learner -> rollout server weight sync vs a plain broadcast of the same bytes (CPU, gloo).

    python benchmarks/bench_weight_sync.py                         # spawns --tp x --pp ranks itself
    python benchmarks/bench_weight_sync.py --bucket-mb 16 512 --repeats 3 --hidden 640 --layers 10
    torchrun --nproc_per_node 4 benchmarks/bench_weight_sync.py   # the same, under torchrun

One run: a randomly initialised Hugging Face Qwen2 (tied embeddings; ~65M parameters with the
defaults) is written to a temp dir (or --model-path is used); global rank 0 starts ONE embedded
rollout server process on it; a megatron-core GPTModel at TP x PP (gloo) plays the learner. Per
bucket size, each after one warm-up:

  sync     `WeightSync.sync`, collective over every learner rank, end to end: pause/flush, then
           each pipeline stage's sender (TP rank 0) at once over its own weight-update group: TP
           gathers of its stage, HF conversion, per bucket one POST
           /update_weights_from_distributed + one flat broadcast, the server's validation and
           staging; then the outcome exchange, the commit (/flush_cache: the server puts every
           staged tensor into its model; /update_weight_version), continue, the outcome broadcast;
  stream   `iter_hf_weights(destination="stage")` alone (the learner-side part of a sync), with its
           buffers reused from one stream to the next as a sync on CPU does;
  plain    the transport floor: rank 0 broadcasts, over stage 0's group to the same server, ALL
           the sync's bytes in the same bucket sizes, prepared in advance, from one rank (the
           sync sends from one rank per stage). The server receives a broadcast only inside
           /update_weights_from_distributed, so each bucket is announced as ONE uint8 tensor
           under a name the model does not have: the server receives it and then refuses to
           apply it (an HTTP round trip + the broadcast, as for each bucket of a sync);
  flat     the same floor with ONE broadcast of all bytes;
  tensor   colocated mode, `WeightSync(mode="tensor")` end to end: the same gathers, then each bucket
           copied into shared memory and POSTed to /update_weights_from_tensor (handles only).

Wall times are medians over --repeats, taken on rank 0 between a barrier and the end of the
collective; so are the CPU seconds every learner rank and the server process spent in them. MB/s = bytes / seconds (MB = 2**20 bytes). Numbers on a shared CPU box are noisy:
the 1-, 5- and 15-minute load averages are printed before and after (every learner rank and the
server need a core of their own for the figures to mean anything).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAKE_NAME = "bench.not_a_parameter"  # the server receives a broadcast announced under it, applies nothing


def make_model(path: str, args) -> int:
    """A random Qwen2 checkpoint at `path`; returns its parameter count."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, tie_word_embeddings=True, max_position_embeddings=256)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


_SERVER_PID: list[int] = []  # rank 0: the embedded server's process, whose CPU time counts too


def _cpu_seconds() -> float:
    """CPU seconds (user + system, every thread) of this rank, and on rank 0 of the server process too."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    for pid in _SERVER_PID:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """Medians of the wall time and of the CPU seconds all learner ranks and the server spent."""
    times, cpu = [], []
    for _ in range(repeats):
        dist.barrier()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
        spent = torch.tensor([_cpu_seconds() - c0], dtype=torch.float64)
        dist.all_reduce(spent)
        cpu.append(float(spent))
    return statistics.median(times), statistics.median(cpu)


def _http_round_trip_ms(client, url: str, calls: int = 20) -> float:
    """Median milliseconds of one kept-alive GET /get_weight_version (every bucket of a sync costs at least one)."""
    times = []
    for _ in range(calls + 1):
        t0 = time.perf_counter()
        client.get_weight_version()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def _plain_broadcast(client, url: str, group, group_name: str, buffers: list[torch.Tensor]) -> None:
    """Per buffer: announce it as one uint8 tensor of an unknown name, broadcast it, expect the refusal."""
    from erc_megatron.rollout.client import SGLangError

    for flat in buffers:
        answer = client.submit(client.update_weights_from_distributed, url, [FAKE_NAME], [torch.uint8],
                               [[flat.numel()]], group_name, None, "flattened_bucket", False)
        dist.broadcast(flat, src=0, group=group)
        try:
            answer.result()
        except SGLangError as exc:
            if FAKE_NAME not in str(exc):  # anything but "unknown name" means the floor was not measured
                raise
        else:
            raise RuntimeError(f"the server applied {FAKE_NAME!r}; the plain measurement is invalid")


def run(rank: int, args, path: str) -> None:
    from megatron.core import parallel_state as ps

    from erc_megatron.dist import init_distributed
    from erc_megatron.model.config import ParallelConfig
    from erc_megatron.model.gpt import build_gpt_model
    from erc_megatron.rollout.client import SGLangClient
    from erc_megatron.rollout.flat_bucket import flatten_tensors
    from erc_megatron.rollout_server.server import launch_server_process
    from erc_megatron.sync.weight_sync import WeightSync
    from erc_megatron.weights.checkpoint_io import hf_config_to_model_config
    from erc_megatron.weights.hf_stream import iter_hf_weights, plan_hf_buckets
    from erc_megatron.weights.transfer_buffers import TransferBuffers

    wire = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.wire_dtype]
    cfg = hf_config_to_model_config(path)
    init_distributed(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp), cfg)
    server = client = None
    if rank == 0:
        server = launch_server_process(path, extra_args=["--num-threads", str(args.server_threads)])
        _SERVER_PID.append(server.process.pid)
        client = SGLangClient([server.url], timeout=1800, max_retries=1)
        args.http_ms = _http_round_trip_ms(client, server.url)
    try:
        # the weights' values do not matter here, only their layout: megatron's own init
        learner = SimpleNamespace(model=build_gpt_model(cfg))
        rows = []
        version = 0
        for mb in args.bucket_mb:
            bucket_bytes = int(mb * 2**20)
            plan = [b for stage in plan_hf_buckets(cfg, args.pp, bucket_bytes, wire) for b in stage]
            sizes = [sum(s.numel for s in b) * wire.itemsize for b in plan]
            sync = WeightSync(learner, cfg, client, bucket_bytes, group_name=f"bench_{mb}", dtype=wire,
                              timeout_s=1800)

            waits = []

            def one_sync():
                nonlocal version
                version += 1
                sync.sync(version)
                waits.append(sync.last_gather_wait_s)

            buffers = TransferBuffers()  # reused from one stream to the next, as a sync on CPU does

            def stream():
                for bucket in iter_hf_weights(learner.model, cfg, bucket_bytes, dtype=wire, destination="stage",
                                              buffers=buffers):
                    buffers.release(flatten_tensors([t for _, t in bucket]))  # what a sync sends

            one_sync()  # warm-up, and builds the group
            t_sync = _median_time(one_sync, args.repeats)
            if rank == 0:
                assert sync.last_bytes == sum(sizes), (sync.last_bytes, sum(sizes))
                assert client.get_weight_version()[server.url] == str(version)
            colocated = WeightSync(learner, cfg, client, bucket_bytes, dtype=wire, timeout_s=1800, mode="tensor")

            def one_tensor_sync():
                nonlocal version
                version += 1
                colocated.sync(version)

            one_tensor_sync()
            t_tensor = _median_time(one_tensor_sync, args.repeats)
            if rank == 0:
                assert client.get_weight_version()[server.url] == str(version)
            stream()
            t_stream = _median_time(stream, args.repeats)
            buffers = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes] if rank == 0 else []

            def plain():
                if rank == 0:
                    _plain_broadcast(client, server.url, sync.group, sync.group_name, buffers)

            plain()
            t_plain = _median_time(plain, args.repeats)
            flat = [torch.cat(buffers)] if rank == 0 else []
            del buffers

            def plain_flat():
                if rank == 0:
                    _plain_broadcast(client, server.url, sync.group, sync.group_name, flat)

            plain_flat()
            t_flat = _median_time(plain_flat, args.repeats)
            del flat
            sync.close()
            rows.append(dict(mb=mb, buckets=len(sizes), nbytes=sum(sizes), sync=t_sync[0], stream=t_stream[0],
                             plain=t_plain[0], flat=t_flat[0], tensor=t_tensor[0],
                             wait=statistics.median(waits[1:] or waits), cpu_sync=t_sync[1], cpu_plain=t_plain[1],
                             cpu_stream=t_stream[1]))
        if rank == 0:
            _print_table(rows, args, cfg)
        dist.barrier()  # every sender has closed its group before rank 0 stops the server
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.terminate()
        ps.destroy_model_parallel()


def _print_table(rows: list[dict], args, cfg) -> None:
    def rate(n, t):
        return n / 2**20 / t

    print(f"\nweight sync benchmark: TP{args.tp} x PP{args.pp} learner (gloo, {args.threads} thread/rank) -> 1 embedded "
          f"server ({args.server_threads} thread); Qwen2 hidden {cfg.hidden_size}, {cfg.num_layers} layers, ffn "
          f"{cfg.ffn_hidden_size}, vocab {cfg.vocab_size}, tied; wire dtype {args.wire_dtype}; median of "
          f"{args.repeats}")
    head = (f"{'bucket MB':>9} {'buckets':>7} {'bytes':>12} | {'sync s':>7} {'MB/s':>7} {'wait s':>6} | {'stream s':>8} | "
            f"{'plain s':>7} {'MB/s':>7} | {'flat s':>7} {'MB/s':>7} | {'sync/plain':>10} {'sync/flat':>9} | "
            f"{'tensor s':>8} | {'cpu sync':>8} {'cpu plain':>9} {'ratio':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        n = r["nbytes"]
        print(f"{r['mb']:>9g} {r['buckets']:>7d} {n:>12d} | {r['sync']:>7.3f} {rate(n, r['sync']):>7.1f} "
              f"{r['wait']:>6.3f} | "
              f"{r['stream']:>8.3f} | {r['plain']:>7.3f} {rate(n, r['plain']):>7.1f} | {r['flat']:>7.3f} "
              f"{rate(n, r['flat']):>7.1f} | {r['sync'] / r['plain']:>10.2f} {r['sync'] / r['flat']:>9.2f} | "
              f"{r['tensor']:>8.3f} | {r['cpu_sync']:>8.2f} {r['cpu_plain']:>9.2f} "
              f"{r['cpu_sync'] / r['cpu_plain']:>5.2f}")
    print(f"HTTP round trip (kept-alive GET, median of 20): {args.http_ms:.2f} ms")
    best = min(r["sync"] / r["plain"] for r in rows)
    nbytes = args.project_params * 2
    nic = args.project_gbps / 8 * 1e9 * args.project_efficiency  # bytes/s of one NIC
    print(f"wait s: the slowest sender's wait for its next bucket's gather inside a sync (what the overlap did "
          f"not hide). cpu: CPU seconds (user + system) of all learner ranks and the server per sync / plain "
          f"broadcast, and their ratio; with fewer free cores than processes, wall time follows it.\nProjection, {args.project_params / 1e9:g}B parameters in bf16 ({nbytes / 1e9:g} GB), each "
          f"sender GPU with its own {args.project_gbps:g} Gb/s NIC at {args.project_efficiency:.0%} efficiency, "
          f"{args.project_nics} NICs per node (the servers' node receives at most that many streams at once):")
    for stages in sorted({1, 2, 4, args.project_nics}):
        floor = nbytes / (min(stages, args.project_nics) * nic)
        print(f"  PP{stages}: {stages} sender(s), broadcast floor {floor:.2f} s; x the best sync/plain here "
              f"({best:.2f}) = {floor * best:.2f} s")
    print("load averages (1, 5, 15 min): before " + " ".join(f"{x:.2f}" for x in args.load_before) +
          ", after " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs", flush=True)


def _spawned(rank: int, world: int, port: int, args, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        run(rank, args, path)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the learner")
    p.add_argument("--pp", type=int, default=2, help="pipeline-parallel size of the learner")
    p.add_argument("--bucket-mb", type=float, nargs="+", default=[16, 512], help="bucket sizes to measure (MiB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--layers", type=int, default=10, help="a multiple of --pp")
    p.add_argument("--ffn", type=int, default=1792)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--wire-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype the weights travel in (the server keeps float32)")
    p.add_argument("--model-path", default=None, help="use this HF checkpoint instead of making a random one")
    p.add_argument("--threads", type=int, default=1, help="torch threads per learner rank")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--project-params", type=float, default=30e9, help="model size for the printed projection")
    p.add_argument("--project-gbps", type=float, default=400, help="sender NIC speed for the projection (Gb/s)")
    p.add_argument("--project-efficiency", type=float, default=0.9, help="achieved fraction of the NIC speed")
    p.add_argument("--project-nics", type=int, default=8, help="NICs per node for the projection")
    args = p.parse_args(argv)
    args.load_before = os.getloadavg()
    if args.layers % args.pp:
        p.error(f"--layers {args.layers} must be a multiple of --pp {args.pp}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the embedded server speaks gloo only
    world = args.tp * args.pp
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ["RANK"]) if torchrun else 0
    tmp = tempfile.mkdtemp(prefix="bench_weight_sync_") if rank == 0 and not args.model_path else None
    path = (args.model_path or os.path.join(tmp, "qwen2")) if rank == 0 else ""
    try:
        if rank == 0 and not args.model_path:
            print(f"random Qwen2 with {make_model(path, args) / 1e6:.1f}M parameters at {path}", flush=True)
        if torchrun:
            if int(os.environ["WORLD_SIZE"]) != world:
                p.error(f"WORLD_SIZE {os.environ['WORLD_SIZE']} != --tp x --pp = {world}")
            torch.set_num_threads(args.threads)
            dist.init_process_group("gloo")
            box = [path]  # rank 0's checkpoint, for every rank
            dist.broadcast_object_list(box, src=0)
            try:
                run(rank, args, box[0])
            finally:
                dist.destroy_process_group()
        else:
            import socket

            import torch.multiprocessing as mp

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(_spawned, args=(world, port, args, path), nprocs=world, start_method="spawn")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    main()
