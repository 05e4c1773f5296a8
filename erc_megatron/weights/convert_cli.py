"""`erc-megatron convert`: load a HF checkpoint into a TP x PP Megatron model and export it again.

    torchrun --nproc_per_node 4 -m erc_megatron.cli convert --hf-dir IN --out OUT --tp 2 --pp 2 --check

--check compares every exported tensor with the input checkpoint (exact when the dtype is kept)
and exits 1 on any difference: a round-trip test of the conversion at that layout.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-dir", required=True, help="input Hugging Face checkpoint (safetensors)")
    parser.add_argument("--out", required=True, help="output directory for the re-exported HF checkpoint")
    parser.add_argument("--tp", type=int, default=1, help="tensor_model_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    parser.add_argument("--params-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the Megatron parameters (and of the export)")
    parser.add_argument("--max-shard-bytes", type=int, default=4 << 30, help="largest output safetensors file")
    parser.add_argument("--check", action="store_true", help="compare the export with the input, exit 1 if different")


def compare_checkpoints(reference_dir: str, candidate_dir: str) -> list[str]:
    """Every difference between two HF checkpoints' tensors (names, shapes, values), empty if identical.

    Values are compared in the candidate's dtype, exactly.
    """
    from .checkpoint_io import HFCheckpointReader

    problems = []
    with HFCheckpointReader(reference_dir) as ref, HFCheckpointReader(candidate_dir) as cand:
        ref_names, cand_names = ref.names(), cand.names()
        for name in sorted(ref_names - cand_names):
            problems.append(f"{name}: missing from {candidate_dir}")
        for name in sorted(cand_names - ref_names):
            problems.append(f"{name}: not in {reference_dir}")
        for name in sorted(ref_names & cand_names):
            a, b = ref.read(name), cand.read(name)
            if a.shape != b.shape:
                problems.append(f"{name}: shape {tuple(b.shape)} != {tuple(a.shape)}")
            elif not torch.equal(a.to(b.dtype), b):
                diff = (a.double() - b.double()).abs().max().item()
                problems.append(f"{name}: values differ (max abs diff {diff:.3g})")
    return problems


def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from erc_megatron.dist.startup import init_distributed, shutdown_distributed
    from erc_megatron.model.config import ParallelConfig
    from erc_megatron.model.gpt import build_gpt_model
    from erc_megatron.utils.console import Progress, say

    from .checkpoint_io import hf_config_to_model_config, load_hf_checkpoint, save_hf_checkpoint

    hf_config = AutoConfig.from_pretrained(args.hf_dir)
    cfg = hf_config_to_model_config(hf_config, params_dtype=args.params_dtype)
    owns_group = not dist.is_initialized()
    layout = init_distributed(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp),
                              cfg)
    try:
        with Progress(f"building the model ({cfg.num_layers} layers)"):
            model = build_gpt_model(cfg, layout=layout)
        with Progress(f"loading {args.hf_dir}"):
            load_hf_checkpoint(model, args.hf_dir, cfg, layout=layout)
        with Progress(f"writing {args.out}"):
            save_hf_checkpoint(model, cfg, args.out, tokenizer_dir=args.hf_dir, hf_config=hf_config,
                               max_shard_bytes=args.max_shard_bytes, layout=layout)
        status = 0
        say(f"exported {args.hf_dir} at TP{args.tp} x PP{args.pp} to {args.out}")
        if dist.get_rank() == 0:
            if args.check:
                problems = compare_checkpoints(args.hf_dir, args.out)
                for p in problems[:20]:
                    print(f"MISMATCH {p}")
                print(f"round trip TP{args.tp} x PP{args.pp}: "
                      f"{'OK, every tensor identical' if not problems else f'{len(problems)} differences'}")
                status = 1 if problems else 0
        if args.check:
            flag = torch.tensor([status], device="cuda" if torch.cuda.is_available() else "cpu")
            dist.broadcast(flag, src=0)  # every rank exits with rank 0's verdict
            status = int(flag.item())
        return status
    finally:
        if owns_group:
            shutdown_distributed()
