"""`erc-megatron` command line: one subcommand per job, each in the module that owns it.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; modules are imported
only when their subcommand runs, so `erc-megatron serve` never imports megatron-core.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from erc_megatron import __version__

SUBCOMMANDS = {
    "train": ("erc_megatron.train.main", "train with ERC / DAPO / GPPO (run under torchrun)"),
    "serve": ("erc_megatron.rollout_server.server", "embedded rollout server speaking SGLang's HTTP protocol"),
    "plot": ("erc_megatron.train.plot", "plot a run directory's metrics into a PNG"),
    "make-demo-model": ("erc_megatron.data.demo_model", "create the tiny CPU demo model, tokenizer and dataset"),
    "convert": ("erc_megatron.weights.convert_cli", "convert Hugging Face <-> Megatron checkpoints"),
    "profile-comm": ("erc_megatron.comm.report", "re-render a run's communication profile (table, PNG, trace)"),
    "plan": ("erc_megatron.plan.cli", "predict per-rank memory and per-step collectives; list the layouts that fit"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="erc-megatron", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    if chosen is not None:
        # before the subcommand imports megatron-core / transformers: their import-time warnings
        # are filtered here, and ranks other than 0 go quiet
        from erc_megatron.utils import console

        console.setup()
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
