"""Per-step metrics to JSONL and TensorBoard, plus a one-line progress report (rank 0 only)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception as exc:  # noqa: BLE001 - tensorboard is optional for a run
                print(f"[erc-megatron] TensorBoard disabled: {exc}", flush=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint, so the file has each step once."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", -1) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
    def g(key, fmt="{:.3f}"):
        v = m.get(key)
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)

    return (f"step {step}/{total} | reward {g('rollout/reward_mean')} acc {g('rollout/accuracy')} "
            f"| val_acc {g('val/accuracy')} | len {g('rollout/response_length', '{:.1f}')} "
            f"| H {g('entropy/mean')} rho {g('erc/rho_mean')} erc_in_band {g('erc/in_band_frac')} "
            f"ppo_clip {g('pg/clip_frac')} | loss {g('pg/loss', '{:.4f}')} gnorm {g('grad_norm')} "
            f"| t rollout {g('time/rollout', '{:.1f}')}s old {g('time/old_policy', '{:.1f}')}s "
            f"upd {g('time/update', '{:.1f}')}s sync {g('time/weight_sync', '{:.1f}')}s")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory of `erc-megatron train`?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
