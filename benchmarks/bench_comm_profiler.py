"""Benchmark: step time of the CPU demo (TP=2 x PP=2, 4 gloo ranks + the embedded rollout server)
with the communication profiler off and on (every step profiled).

    python benchmarks/bench_comm_profiler.py                       # makes the demo model if needed
    python benchmarks/bench_comm_profiler.py --steps 10 --pairs 3 --demo runs/demo_model

Launches alternate off, on, on, off, ... (`--pairs` of each), so slow drift of a shared machine
falls on both sides. Every launch is the same deterministic run (same seed, same rollouts, same
updates: the profiler does not change numerics), with examples/cpu_demo.yaml and no validation.
Step time = time/rollout + time/old_policy + time/update + time/weight_sync from metrics.jsonl,
the first step (weight-sync group set-up) left out. Printed: median step time off / on, the
overhead ratio, the profiled collectives per step and the per-collective cost that implies.
"Off" installs nothing (no wrappers: tests/comm/test_profiler.py checks it); what remains in the
code path is one `comm_phase(...)` call per phase marker, timed here in-process as well.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIME_KEYS = ("time/rollout", "time/old_policy", "time/update", "time/weight_sync")


def _launch(demo: Path, run_dir: Path, steps: int, profile: bool) -> list[float]:
    overrides = [f"model.path={demo / 'model'}", f"data.train_path={demo / 'train.jsonl'}",
                 f"data.val_path={demo / 'val.jsonl'}", f"trainer.run_dir={run_dir}",
                 f"trainer.steps={steps}", "validation.every_steps=0",
                 "trainer.save_every=0", f"trainer.profile_comm={'true' if profile else 'false'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "erc_megatron.cli", "train", "--config", str(REPO / "examples" / "cpu_demo.yaml"), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"launch failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [sum(r[k] for k in TIME_KEYS) for r in records if "time/update" in r][1:]


def _phase_marker_cost(n: int = 200_000) -> float:
    from erc_megatron.comm import comm_phase

    t0 = time.perf_counter()
    for _ in range(n):
        with comm_phase("optimizer"):
            pass
    return (time.perf_counter() - t0) / n


def _per_call_overhead(n: int = 3000) -> tuple[float, float]:
    """(seconds per all_reduce of 64 floats on a 1-rank gloo group without / with a profiled step open)."""
    import torch
    import torch.distributed as dist

    from erc_megatron.comm import CommProfiler

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        t = torch.ones(64)
        prof = CommProfiler(tempfile.mkdtemp(), steps=[1], say=lambda *_: None)
        prof.finish = lambda: None  # time the recording, not the report
        best = {False: float("inf"), True: float("inf")}
        for _ in range(5):  # min over rounds: the least disturbed by other processes
            for on in (False, True):
                if on:
                    prof._step = None
                    prof.begin_step(1)
                t0 = time.perf_counter()
                for _ in range(n):
                    dist.all_reduce(t)
                if on:
                    prof.end_step()
                best[on] = min(best[on], (time.perf_counter() - t0) / n)
        return best[False], best[True]
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="steps per launch (the first is left out)")
    p.add_argument("--pairs", type=int, default=2, help="launches of each kind")
    p.add_argument("--demo", type=Path, default=None, help="demo dir from `erc-megatron make-demo-model`")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_comm_"))
    demo = args.demo
    if demo is None or not (demo / "model").exists():
        demo = demo or work / "demo"
        print(f"making the demo model in {demo} ...", flush=True)
        subprocess.run([sys.executable, "-m", "erc_megatron.cli", "make-demo-model", "--out", str(demo)], cwd=REPO,
                       check=True, capture_output=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    order = [False, True, True, False] * ((args.pairs + 1) // 2)
    order = order[: 2 * args.pairs]
    events_per_step = []
    for i, profile in enumerate(order):
        run_dir = work / f"run{i}_{'on' if profile else 'off'}"
        t0 = time.monotonic()
        steps = _launch(demo, run_dir, args.steps, profile)
        times[profile] += steps
        if profile:
            prof = json.loads((run_dir / "comm_profile.json").read_text())
            n = sum(len(r["events"]) for r in prof["ranks"]) / len(prof["ranks"]) / len(prof["steps"])
            events_per_step.append(n)
        print(f"launch {i + 1}/{len(order)} profile {'on ' if profile else 'off'}: {time.monotonic() - t0:.0f}s, "
              f"median step {statistics.median(steps) * 1e3:.0f} ms", flush=True)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    per_event = (on - off) / statistics.mean(events_per_step)
    marker = _phase_marker_cost()
    plain, hooked = _per_call_overhead()
    bound = statistics.mean(events_per_step) * (hooked - plain) / off
    print(f"\nsteps measured: {len(times[False])} off, {len(times[True])} on ({args.steps - 1} per launch)")
    print(f"median step time  off {off * 1e3:.1f} ms   on {on * 1e3:.1f} ms   on/off {on / off:.4f} "
          f"(overhead {100 * (on / off - 1):+.2f}%)")
    print(f"profiled collectives per step per rank: {statistics.mean(events_per_step):.0f}; implied cost "
          f"{per_event * 1e6:.0f} us each")
    print(f"in-process: all_reduce (64 floats, 1-rank gloo) {plain * 1e6:.1f} us plain, {hooked * 1e6:.1f} us "
          f"profiled: +{(hooked - plain) * 1e6:.1f} us per call; x {statistics.mean(events_per_step):.0f} calls per "
          f"step = {100 * bound:.2f}% of the off step time (the recording cost without machine noise)")
    print(f"off: no hooks installed; one comm_phase() marker costs {marker * 1e9:.0f} ns when off "
          f"(4 per step + 3 per optimizer step = 10 per demo step: {(10 * marker) / off * 100:.5f}% of a step)")


if __name__ == "__main__":
    main()
