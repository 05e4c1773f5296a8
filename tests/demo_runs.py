"""What the end-to-end and launcher tests share: the small demo model and reading a run's metrics."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def make_small_demo(out: Path) -> Path:
    """The CPU demo model with a short warm-up, made in this process (no extra launch): the wrong +1
    answer dominates, sampled groups still mix right and wrong."""
    from erc_megatron.data.demo_model import DemoModelConfig, WarmupConfig, make_demo
    from erc_megatron.data.synthetic import AdditionTaskConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_demo(str(out), DemoModelConfig(), AdditionTaskConfig(num_train=400), WarmupConfig(steps=80),
                  log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl` so far (a line being written right now is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out
