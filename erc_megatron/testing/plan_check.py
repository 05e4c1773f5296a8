"""Measure what the planner predicts: several layouts, each trained for two steps (the second profiled), in ONE launch.

    torchrun --nproc_per_node 4 -m erc_megatron.testing.plan_check --recipe R --out DIR \
        --layout dp4:parallel.tensor_model_parallel_size=1 --layout tp2pp2:... [-- overrides for all]

For each `--layout NAME:overrides` (comma-separated `section.key=value`), every rank runs the real
trainer (`erc_megatron.train.main.train`) for two steps with the communication profiler on for the
second, under `OUT/NAME/` (the planner predicts a steady step; megatron-core 0.19's optimizer adds a
one-time 4-byte all-reduce to its first step); the launch's process group is reused, megatron's
parallel state is rebuilt per layout.
Each layout also writes `OUT/NAME/memory_rank{R}.json`: the rank's parameter, gradient-buffer and
optimizer-state bytes counted on the live objects, and the peak of CPU tensor memory above the level
at the call during the run's first forward-backward (activations, logits, temporaries).
`erc_megatron.plan.agreement` compares them with the prediction.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace


def _state_bytes(learner) -> dict[str, int]:
    import torch

    params = sum(p.numel() * p.element_size() for p in learner.model.parameters())
    buffers = list(getattr(learner.model, "buffers", [])) + list(getattr(learner.model, "expert_parallel_buffers", []))
    grads = sum(buf.grad_data.numel() * buf.grad_data.element_size() for buf in buffers)
    seen: set[int] = set()
    optim = 0
    opts = getattr(learner.optimizer, "chained_optimizers", None) or [learner.optimizer]
    for opt in opts:
        inner = getattr(opt, "optimizer", opt)
        for state in inner.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor) and t.numel() > 1 and id(t) not in seen:
                    seen.add(id(t))
                    optim += t.numel() * t.element_size()
        for group in getattr(opt, "shard_fp32_from_float16_groups", None) or \
                getattr(opt, "fp32_from_float16_groups", None) or []:
            for t in group:
                if id(t) not in seen:
                    seen.add(id(t))
                    optim += t.numel() * t.element_size()
    return {"params": params, "grads": grads, "optimizer": optim}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layout", action="append", required=True, help="NAME:key=value,key=value")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    import erc_megatron.train.learner as learner_mod
    import erc_megatron.train.update as update_mod
    from erc_megatron.testing.peak_memory import peak_cpu_bytes
    from erc_megatron.train.config import RunConfig
    from erc_megatron.train.main import train
    from erc_megatron.utils import config_tree

    torch.set_num_threads(1)
    built: list = []
    original_build, original_fb = learner_mod.build_learner, update_mod.forward_backward
    peak: dict[str, int] = {}

    def build(*a, **kw):
        built.append(original_build(*a, **kw))
        return built[-1]

    def forward_backward(*a, **kw):
        if "bytes" in peak:
            return original_fb(*a, **kw)
        out, peak["bytes"] = peak_cpu_bytes(lambda: original_fb(*a, **kw))
        return out

    learner_mod.build_learner = build
    update_mod.forward_backward = forward_backward
    for spec in args.layout:
        name, _, extra = spec.partition(":")
        run_dir = os.path.join(args.out, name)
        overrides = [*args.overrides, f"trainer.run_dir={run_dir}", "trainer.steps=2", "trainer.profile_comm=true",
                     "trainer.profile_steps=[2]", "trainer.resume=false",
                     *[o for o in extra.split(",") if o]]
        cfg = config_tree.load(RunConfig, args.recipe, overrides)
        built.clear()
        peak.clear()
        train(cfg)
        state = _state_bytes(built[-1])
        rank = dist.get_rank()
        with open(os.path.join(run_dir, f"memory_rank{rank}.json"), "w") as f:
            json.dump({**state, "forward_backward_peak": peak.get("bytes", 0)}, f)
        dist.barrier()
    from erc_megatron.dist import shutdown_distributed

    shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ---------------------------------------------------------------------------------------------- comparison
def trainer_sync_destination(mode: str = "distributed") -> str:
    """Which senders the trainer's weight sync uses in `mode` ("stage" or "rank0")."""
    from erc_megatron.sync.weight_sync import SENDERS

    return SENDERS[mode]


def compare_layout(recipe: str, overrides: list[str], run_dir: str, world: int) -> dict:
    """Predicted vs measured bytes and calls per role (and per role and op), and memory, of one layout's
    profiled step. The prediction takes the step's micro-batch shapes from the profile (the data decide
    them) and everything else from the recipe."""
    from erc_megatron.plan.comm import (ESTIMATED_OPS, ESTIMATED_ROLES, estimate_key, measured_events, predict_step,
                                       shapes_from_profile, totals)
    from erc_megatron.plan.inputs import (arch_with_recipe, layout_from_recipe, load_hf_config, load_raw_recipe,
                                          workload_from_recipe)
    from erc_megatron.plan.memory import activation_bytes, logits_bytes, model_state_bytes

    tree = load_raw_recipe(recipe, overrides)
    hf, _ = load_hf_config(tree["model"]["path"])
    arch = arch_with_recipe(hf, tree, "demo")
    from erc_megatron.model.config import ParallelConfig
    from erc_megatron.plan.inputs import trainer_has

    layout = layout_from_recipe(tree, world, trainer_has(ParallelConfig, "use_distributed_optimizer"))
    work = replace(workload_from_recipe(tree, backend="gloo"), sync_destination=trainer_sync_destination())
    with open(os.path.join(run_dir, "comm_profile.json")) as f:
        profile = json.load(f)
    shapes = shapes_from_profile(profile)
    # estimated ops get their own role row, so the rest of their role is still checked exactly
    predicted = [replace(ev, role=estimate_key(ev.role, ev.op)) for ev in predict_step(arch, layout, work, shapes)]
    measured = [replace(ev, role=estimate_key(ev.role, ev.op)) for ev in measured_events(profile)]
    out: dict = {"layout": layout.label, "shapes": [shapes.b, shapes.s, shapes.old_policy, list(shapes.updates)],
                 "roles": {}, "ops": {}}
    for keys, table in ((("role",), "roles"), (("role", "op"), "ops")):
        pred, meas = totals(predicted, keys), totals(measured, keys)
        for k in sorted(set(pred) | set(meas)):
            p, m = pred.get(k, {"count": 0, "bytes": 0}), meas.get(k, {"count": 0, "bytes": 0})
            out[table]["/".join(k)] = {"predicted_bytes": p["bytes"], "measured_bytes": m["bytes"],
                                       "predicted_calls": p["count"], "measured_calls": m["count"],
                                       "estimate": k[0] in ESTIMATED_ROLES
                                       or tuple(k[0].split(":", 1)) in ESTIMATED_OPS}
    from erc_megatron.plan.comm import rank_coords

    memory = {}
    for rank in range(world):
        with open(os.path.join(run_dir, f"memory_rank{rank}.json")) as f:
            got = json.load(f)
        stage = rank_coords(rank, layout)[2]
        p, g, o = model_state_bytes(arch, layout, work, stage, rank)
        act = activation_bytes(arch, layout, work, shapes, stage, flash_attention=False)
        lg = logits_bytes(arch, layout, work, shapes) if stage == layout.pp - 1 else 0
        memory[rank] = {"predicted": {"params": p, "grads": g, "optimizer": o, "forward_backward_peak": act + lg},
                        "measured": got}
    out["memory"] = memory
    return out


def agreement_table(results: dict[str, dict]) -> str:
    """Markdown: per layout and group, predicted vs measured bytes (all ranks, one step) and calls."""
    lines = ["| layout | group | predicted bytes | measured bytes | ratio | predicted calls | measured calls |",
             "|---|---|---|---|---|---|---|"]
    for res in results.values():
        for role, v in res["roles"].items():
            ratio = v["predicted_bytes"] / v["measured_bytes"] if v["measured_bytes"] else float("nan")
            mark = " (estimate)" if v["estimate"] else ""
            lines.append(f"| {res['layout']} | {role}{mark} | {v['predicted_bytes']:,} | {v['measured_bytes']:,} | "
                         f"{ratio:.3f} | {v['predicted_calls']} | {v['measured_calls']} |")
    return "\n".join(lines)


def memory_table(results: dict[str, dict]) -> str:
    lines = ["| layout | rank | params pred / meas | grads pred / meas | optimizer pred / meas | "
             "forward-backward peak pred / meas |", "|---|---|---|---|---|---|"]
    for res in results.values():
        for rank, m in res["memory"].items():
            p, g = m["predicted"], m["measured"]
            cells = [f"{p[k] / 1e6:.3f} / {g[k] / 1e6:.3f} MB" for k in ("params", "grads", "optimizer",
                                                                          "forward_backward_peak")]
            lines.append(f"| {res['layout']} | {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "cpu_demo.yaml")

LAYOUTS = {
    "dp4": "parallel.tensor_model_parallel_size=1,parallel.pipeline_model_parallel_size=1",
    "tp2dp2": "parallel.tensor_model_parallel_size=2,parallel.pipeline_model_parallel_size=1",
    "tp2pp2": "parallel.tensor_model_parallel_size=2,parallel.pipeline_model_parallel_size=2",
    "pp2dp2": "parallel.tensor_model_parallel_size=1,parallel.pipeline_model_parallel_size=2",
    "dp4_ddp": "parallel.tensor_model_parallel_size=1,parallel.pipeline_model_parallel_size=1,"
               "parallel.use_distributed_optimizer=false",
    # {moe_model}: a tiny Qwen3-MoE checkpoint with the demo's tokenizer (tests/plan: tiny_moe_model)
    "ep2_moe": "model.path={moe_model},parallel.tensor_model_parallel_size=1,parallel.pipeline_model_parallel_size=1,"
               "parallel.expert_model_parallel_size=2",
}
"""Layouts of 4 ranks the agreement check runs (name: comma-separated overrides)."""


def demo_overrides(demo_dir: str) -> list[str]:
    """A short step of the CPU demo: 2 optimizer steps of 2 prompts x 4 samples, micro-batches of 2,
    every group learnt from (no dynamic sampling, so the step always has an update)."""
    return [f"model.path={demo_dir}/model", f"data.train_path={demo_dir}/train.jsonl", "data.val_path=null",
            "validation.every_steps=0", "trainer.prompts_per_step=4", "trainer.prompts_per_minibatch=2",
            "trainer.micro_batch_size=2", "rollout.n_samples_per_prompt=4", "rollout.dynamic_sampling=false"]


def run_layouts(demo_dir: str, out_dir: str, layouts: dict[str, str], recipe: str = RECIPE, nproc: int = 4,
                timeout: float = 900, extra: list[str] = ()) -> dict[str, dict]:
    """One torchrun launch training every layout for two steps (the second profiled), then the comparison of each."""
    import subprocess
    import sys

    common = [*demo_overrides(demo_dir), *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "erc_megatron.testing.plan_check", "--recipe", recipe, "--out", out_dir,
           *[f"--layout={name}:{spec}" for name, spec in layouts.items()], *common]
    log = os.path.join(out_dir, "launch.log")
    os.makedirs(out_dir, exist_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode:
        with open(log, errors="replace") as f:
            raise RuntimeError(f"plan_check launch failed (rc {proc.returncode}):\n{f.read()[-6000:]}")
    return {name: compare_layout(recipe, common + [o for o in spec.split(",") if o], os.path.join(out_dir, name), nproc)
            for name, spec in layouts.items()}
