"""The planner's agreement figures for the README: predicted vs measured bytes per process group and
layout, and predicted vs measured memory per rank, from ONE 4-rank launch of the CPU demo
(erc_megatron.testing.plan_check; tests/plan/test_plan_agreement.py asserts the same on 3 layouts).

    python benchmarks/plan_agreement.py                      # makes the demo model if needed
    python benchmarks/plan_agreement.py --demo runs/demo_model --out runs/plan_agreement

Prints two markdown tables; writes OUT/agreement.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="runs/plan_demo", help="demo model directory (made if missing)")
    p.add_argument("--out", default="runs/plan_agreement")
    from erc_megatron.testing.plan_check import LAYOUTS, agreement_table, memory_table, run_layouts

    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS),
                   help="layouts of erc_megatron.testing.plan_check.LAYOUTS to run (default: all)")
    args = p.parse_args()

    if not os.path.exists(os.path.join(args.demo, "model", "config.json")):
        from pathlib import Path

        from tests.demo_runs import make_small_demo

        print(f"making the demo model in {args.demo}", flush=True)
        make_small_demo(Path(args.demo))
    layouts = {name: LAYOUTS[name] for name in args.layouts}
    if any("{moe_model}" in spec for spec in layouts.values()):
        from pathlib import Path

        from tests.plan.test_plan_agreement import tiny_moe_model

        moe = os.path.abspath(os.path.join(args.out, "moe_model"))
        os.makedirs(moe, exist_ok=True)
        tiny_moe_model(Path(args.demo), Path(moe))
        layouts = {k: v.replace("{moe_model}", moe) for k, v in layouts.items()}
    t0 = time.monotonic()
    results = run_layouts(os.path.abspath(args.demo), os.path.abspath(args.out), layouts)
    print(f"{len(layouts)} layouts in one launch: {time.monotonic() - t0:.0f} s\n")
    print(agreement_table(results) + "\n")
    print(memory_table(results))
    with open(os.path.join(args.out, "agreement.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
