"""`erc-megatron plot RUN_DIR`: reward / accuracy, entropy, ERC clip fractions and response length
against step, into RUN_DIR/metrics.png (or --out)."""
from __future__ import annotations

import argparse
from pathlib import Path

from erc_megatron.train.metrics_log import read_metrics

PANELS = (
    ("reward and accuracy", ("rollout/reward_mean", "rollout/accuracy", "val/accuracy")),
    ("entropy (nats)", ("entropy/mean", "entropy/old_mean")),
    ("ERC / PPO clipping", ("erc/low_frac", "erc/high_frac", "pg/clip_frac")),
    ("response length (tokens)", ("rollout/response_length",)),
)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records yet")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"erc-megatron: {Path(run_dir).resolve().name}")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `erc-megatron train`")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")


def run(args: argparse.Namespace) -> int:
    print(plot_run(args.run_dir, args.out))
    return 0
