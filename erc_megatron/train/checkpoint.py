"""Save and resume: model shard, optimizer, LR schedule and RNG states per rank, and the trainer
state (step, data position, weight version) once.

Layout: RUN_DIR/checkpoints/step_000010/rank_00003.pt + trainer.json, and RUN_DIR/checkpoints/latest
naming the newest complete one. Each file is written to a temporary name and renamed; `latest` is
updated only after every rank finished (barrier), so a run killed mid-save resumes from the
previous complete checkpoint and nothing half-written is ever loaded. Resuming needs the same
parallel layout (the shards are per rank); a different one is refused with both layouts named.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    return {"torch": torch.get_rng_state(), "tracker": {k: v.clone() for k, v in tracker.get_states().items()},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size()}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(run_dir: str | Path, step: int, learner, trainer_state: dict, keep: int = 2) -> Path:
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(run_dir) / "checkpoints"
    folder = root / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"model": learner.model.state_dict(), "optimizer": learner.optimizer.state_dict(),
               "scheduler": learner.scheduler.state_dict(), "rng": _rng_state(), "layout": _layout()}
    tmp = folder / f".rank_{rank:05d}.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, folder / f"rank_{rank:05d}.pt")
    if rank == 0:
        tmp = folder / ".trainer.json.tmp"
        tmp.write_text(json.dumps({**trainer_state, "step": step, "layout": _layout()}, indent=1))
        os.replace(tmp, folder / "trainer.json")
    _barrier()
    if rank == 0:
        tmp = root / ".latest.tmp"
        tmp.write_text(folder.name)
        os.replace(tmp, root / "latest")
        for old in _prunable(root, step, keep):
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return folder


def _step_of(folder: Path) -> int | None:
    try:
        return int(folder.name.removeprefix("step_"))
    except ValueError:
        return None


def _prunable(root: Path, step: int, keep: int) -> list[Path]:
    """Folders to delete once `step` is the newest complete checkpoint: all but the `keep` newest up to
    it, and any of a LATER step (left half-written by a run killed mid-save; nothing points at them).
    By step number, not by name, so the checkpoint just written is never among them."""
    if keep <= 0:
        return []
    folders = {n: p for p in root.glob("step_*") if p.is_dir() and (n := _step_of(p)) is not None}
    older = sorted(n for n in folders if n < step)
    kept = set(older[max(0, len(older) - (keep - 1)):])
    return [p for n, p in folders.items() if n > step or (n < step and n not in kept)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run, or None if it has none yet.

    Only `latest` is trusted: it is written after every rank's files are in place, so folders
    left half-written by a killed save are never picked. A `latest` naming an incomplete folder
    means someone removed files: that is refused rather than silently restarting from step 0,
    which would overwrite the run's metrics.
    """
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    if not (folder / "trainer.json").exists():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which has no trainer.json (incomplete or "
                                f"deleted); point it at a complete step_* folder, or use trainer.resume=false "
                                f"with a fresh trainer.run_dir")
    return folder


def load_checkpoint(folder: Path, learner) -> dict:
    """Load this rank's shard and states; returns the trainer state (step, data position, ...)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    trainer_state = json.loads((folder / "trainer.json").read_text())
    if trainer_state["layout"] != _layout():
        raise RuntimeError(f"checkpoint {folder} was saved with layout {trainer_state['layout']}, this run has "
                           f"{_layout()}: resume with the same tensor/pipeline parallel sizes and world size")
    path = folder / f"rank_{rank:05d}.pt"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {folder} has no shard for rank {rank} ({path.name})")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    learner.model.load_state_dict(payload["model"])
    learner.optimizer.load_state_dict(payload["optimizer"])
    # megatron's scheduler load steps the schedule forward BY the saved count (it assumes a fresh
    # scheduler): from zero, loading into a learner that already stepped lands on the saved step too
    learner.scheduler.num_steps = 0
    learner.scheduler.load_state_dict(payload["scheduler"])
    _set_rng_state(payload["rng"])
    return trainer_state
