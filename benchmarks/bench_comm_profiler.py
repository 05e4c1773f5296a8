"""Benchmark: step time of the CPU demo (TP=2 x PP=2, 4 gloo ranks + the embedded rollout server)
with the communication profiler on vs off, and the profiler's per-call cost in-process.

    python benchmarks/bench_comm_profiler.py                       # makes the demo model if needed
    python benchmarks/bench_comm_profiler.py --steps 13 --pairs 2 --demo runs/demo_model

Paired design, because the machine is shared and launches drift by +-10%: every launch is the same
deterministic run (same seed, rollouts and updates; the profiler does not change numerics), with
examples/cpu_demo.yaml and no validation. Launch A profiles the even steps, launch B the odd ones,
so every step k >= 2 is measured once profiled and once not; the overhead is the geometric mean
over k of t_on(k) / t_off(k). A launch that runs slow raises the ratios of the steps it profiled
and lowers those of the others by the same factor, which cancels in the mean. Step time =
time/rollout + time/old_policy + time/update + time/weight_sync from metrics.jsonl (step 1, with
the weight-sync group set-up, is left out).

In-process: an all_reduce of 64 floats on a 1-rank gloo group, plain vs inside a profiled step
(best of 30 alternating rounds of 1000 calls), times the profiled collectives per step: the
recording cost without machine noise. "Off" installs nothing (no wrappers:
tests/comm/test_profiler.py checks it); what remains in the code path is one `comm_phase(...)`
call per phase marker, timed here as well.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIME_KEYS = ("time/rollout", "time/old_policy", "time/update", "time/weight_sync")


def _launch(demo: Path, run_dir: Path, steps: int, profile: list[int]) -> dict[int, float]:
    overrides = [f"model.path={demo / 'model'}", f"data.train_path={demo / 'train.jsonl'}",
                 f"data.val_path={demo / 'val.jsonl'}", f"trainer.run_dir={run_dir}",
                 f"trainer.steps={steps}", "validation.every_steps=0",
                 "trainer.save_every=0", f"trainer.profile_comm={'true' if profile else 'false'}",
                 f"trainer.profile_steps={profile}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "erc_megatron.cli", "train", "--config", str(REPO / "examples" / "cpu_demo.yaml"), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"launch failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: sum(r[k] for k in TIME_KEYS) for r in records if "time/update" in r and r["step"] > 1}


def _phase_marker_cost(n: int = 200_000) -> float:
    from erc_megatron.comm import comm_phase

    t0 = time.perf_counter()
    for _ in range(n):
        with comm_phase("optimizer"):
            pass
    return (time.perf_counter() - t0) / n


def _per_call_overhead(n: int = 1000, rounds: int = 30) -> tuple[float, float]:
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
        for r in range(rounds):  # min over alternating rounds: the least disturbed by other processes
            for on in ((False, True) if r % 2 else (True, False)):
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
    p.add_argument("--steps", type=int, default=13, help="steps per launch (the first is left out)")
    p.add_argument("--pairs", type=int, default=1, help="pairs of launches (even steps profiled / odd ones)")
    p.add_argument("--demo", type=Path, default=None, help="demo dir from `erc-megatron make-demo-model`")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_comm_"))
    demo = args.demo
    if demo is None or not (demo / "model").exists():
        demo = demo or work / "demo"
        print(f"making the demo model in {demo} ...", flush=True)
        subprocess.run([sys.executable, "-m", "erc_megatron.cli", "make-demo-model", "--out", str(demo)], cwd=REPO,
                       check=True, capture_output=True)
    on: dict[int, list[float]] = {}
    off: dict[int, list[float]] = {}
    events_per_step = []
    launches = [parity for _ in range(args.pairs) for parity in (0, 1)]
    for i, parity in enumerate(launches):
        profiled = [k for k in range(2, args.steps + 1) if k % 2 == parity]
        run_dir = work / f"run{i}"
        t0 = time.monotonic()
        steps = _launch(demo, run_dir, args.steps, profiled)
        for k, t in steps.items():
            (on if k in profiled else off).setdefault(k, []).append(t)
        prof = json.loads((run_dir / "comm_profile.json").read_text())
        events_per_step.append(sum(len(r["events"]) for r in prof["ranks"]) / len(prof["ranks"]) / len(prof["steps"]))
        print(f"launch {i + 1}/{len(launches)} (profiles steps {profiled}): {time.monotonic() - t0:.0f}s", flush=True)
    ks = sorted(set(on) & set(off))
    ratios = [statistics.median(on[k]) / statistics.median(off[k]) for k in ks]
    ratio = statistics.geometric_mean(ratios)
    off_med = statistics.median(t for k in ks for t in off[k])
    on_med = statistics.median(t for k in ks for t in on[k])
    marker = _phase_marker_cost()
    plain, hooked = _per_call_overhead()
    bound = statistics.mean(events_per_step) * (hooked - plain) / off_med
    print(f"\nsteps {ks[0]}..{ks[-1]}, each measured profiled and not ({len(launches)} launches)")
    print(f"median step time  off {off_med * 1e3:.1f} ms   on {on_med * 1e3:.1f} ms")
    logs = [math.log(r) for r in ratios]
    se = statistics.stdev(logs) / math.sqrt(len(logs))
    print(f"per-step on/off ratio: geometric mean {ratio:.4f} (overhead {100 * (ratio - 1):+.2f}% "
          f"+- {100 * se:.1f}% standard error), median {statistics.median(ratios):.4f}, "
          f"range {min(ratios):.3f}..{max(ratios):.3f}")
    print(f"profiled collectives per step per rank: {statistics.mean(events_per_step):.0f}")
    print(f"in-process: all_reduce (64 floats, 1-rank gloo) {plain * 1e6:.1f} us plain, {hooked * 1e6:.1f} us "
          f"profiled: +{(hooked - plain) * 1e6:.1f} us per call; x {statistics.mean(events_per_step):.0f} calls per "
          f"step = {100 * bound:.2f}% of the off step time (the recording cost without machine noise)")
    print(f"off: no hooks installed; one comm_phase() marker costs {marker * 1e9:.0f} ns when off "
          f"(4 per step + 3 per optimizer step = 10 per demo step: {(10 * marker) / off_med * 100:.5f}% of a step)")


if __name__ == "__main__":
    main()
