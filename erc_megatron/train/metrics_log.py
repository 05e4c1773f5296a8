"""Per-step metrics to JSONL and TensorBoard, plus a one-line progress report (rank 0 only)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLogger:
    """Appends one JSON record per step to RUN_DIR/metrics.jsonl and the scalars to RUN_DIR/tensorboard.

    `resume_step`: the step the run restarts from (0 for a fresh start). Records of later steps, left
    by a run killed after its last checkpoint, are dropped from the JSONL file and purged from
    TensorBoard's view, so each step appears once, with the values of the run that continued.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)
            except Exception as exc:  # noqa: BLE001 - tensorboard is optional for a run
                print(f"[erc-megatron] TensorBoard disabled: {exc}", flush=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint, so the file has each step once, and
        any final-validation record (a run resumed at its last step validates again)."""
        if not self.path.exists():
            return
        kept = [line for line, record in _parse_lines(self.path)
                if record.get("step", -1) <= step and not record.get("final")]
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

    skipped = m.get("skipped")
    note = f" | SKIPPED {skipped:.0f} update(s): non-finite loss/entropy" if skipped and skipped > 0 else ""
    if "moe/aux_loss" in m:  # MoE models: router load balance
        note = f" | moe aux {g('moe/aux_loss')} load max/mean {g('moe/load_max_over_mean', '{:.2f}')}{note}"
    return (f"step {step}/{total} | reward {g('rollout/reward_mean')} acc {g('rollout/accuracy')} "
            f"| val_acc {g('val/accuracy')} | len {g('rollout/response_length', '{:.1f}')} "
            f"| H {g('entropy/mean')} rho {g('erc/rho_mean')} erc_in_band {g('erc/in_band_frac')} "
            f"ppo_clip {g('pg/clip_frac')} | loss {g('pg/loss', '{:.4f}')} gnorm {g('grad_norm')} "
            f"| t rollout {g('time/rollout', '{:.1f}')}s old {g('time/old_policy', '{:.1f}')}s "
            f"upd {g('time/update', '{:.1f}')}s sync {g('time/weight_sync', '{:.1f}')}s{note}")


def _parse_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) pairs; a last line cut short by a killed run is left out, any other bad line raises."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory of `erc-megatron train`?")
    return [record for _, record in _parse_lines(path)]
