"""`erc-megatron plan --config RECIPE [--gpus N --gpu-memory-gb M] [--json OUT]`."""
from __future__ import annotations

import argparse
import json

from erc_megatron.model.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML (see examples/)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="learner GPUs (default: the recipe's TP x PP, i.e. one data-parallel replica)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GB (default 80)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--reserve-gb", type=float, default=4.0,
                        help="per-GPU memory kept for the CUDA context, NCCL and fragmentation (default 4 GiB)")
    parser.add_argument("--hf-config", default=None,
                        help="config.json of the model when model.path holds none and it is not built in")
    parser.add_argument("--mean-sample-tokens", type=int, default=None,
                        help="packed micro-batches: mean prompt + response tokens per sample (default: every sample "
                             "as long as the recipe allows, the worst case)")
    parser.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the whole plan as JSON here")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for train")


def run(args: argparse.Namespace) -> int:
    from erc_megatron.plan.comm import ESTIMATED_ROLES
    from erc_megatron.plan.inputs import load_recipe_inputs
    from erc_megatron.plan.report import comm_table, memory_table, to_json
    from erc_megatron.plan.search import Hardware, evaluate, layout_problems, search

    for name in ("gpus", "gpus_per_node", "top", "mean_sample_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.gpu_memory_gb > 0 or args.reserve_gb < 0:
        raise ConfigError(f"--gpu-memory-gb must be > 0 and --reserve-gb >= 0, got {args.gpu_memory_gb} "
                          f"and {args.reserve_gb}")
    rec = load_recipe_inputs(args.config, args.overrides, args.gpus, args.hf_config)
    gpus = args.gpus or rec.layout.world
    hw = Hardware(gpus=gpus, gpu_memory_bytes=int(args.gpu_memory_gb * 1e9), gpus_per_node=args.gpus_per_node,
                  reserve_bytes=int(args.reserve_gb * 2**30))
    arch, work = rec.arch, rec.work
    if args.mean_sample_tokens:
        from dataclasses import replace

        work = replace(work, mean_tokens_per_sample=float(args.mean_sample_tokens))
    print(f"model {arch.name} ({rec.arch_source}): {arch.num_layers} layers, hidden {arch.hidden}"
          + (f", {arch.num_experts} experts top-{arch.topk}" if arch.is_moe else "")
          + f"; {gpus} GPUs x {args.gpu_memory_gb:g} GB; {work.params_dtype}, "
          + (f"packed micro-batches of {work.max_tokens_per_micro_batch} tokens" if work.max_tokens_per_micro_batch
             else f"micro-batches of {work.micro_batch_size} x {work.seq_length} tokens"))
    mine = None
    problems = layout_problems(arch, rec.layout, work)
    if problems:
        print(f"the recipe's layout {rec.layout.label} is refused: " + "; ".join(problems))
    else:
        mine = evaluate(arch, rec.layout, work, hw)
        verdict = "fits" if mine.fits else "does NOT fit"
        print(f"\nthe recipe's layout {mine.layout.label} {verdict}:")
        print(memory_table([mine], hw))
        print("\ncollectives per step of the recipe's layout"
              f" ({', '.join(ESTIMATED_ROLES)}: estimated pickle sizes):")
        print(comm_table(mine.events))
    cands = search(arch, work, hw)
    print(f"\n{len(cands)} layouts fit; best first by estimated learner seconds per step "
          "(compute at the stated MFU + the busiest rank's TP/PP/DP/EP bytes over NVLink or NIC bandwidth):")
    print(memory_table(cands[:args.top], hw) if cands else "(none: more GPUs, recomputation or a shorter budget)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(to_json(arch, work, hw, cands, mine, rec.arch_source), f, indent=1)
        print(f"\nplan written: {args.json_out}")
    return 0
