"""Save and resume: model shard, optimizer, LR schedule and RNG states per rank, the full model
once in a layout-free form, and the trainer state (step, data position, weight version) once.

Layout: RUN_DIR/checkpoints/step_000010/{rank_00003.pt, model/, trainer.json}, and
RUN_DIR/checkpoints/latest naming the newest complete one. `model/` is a Hugging Face safetensors
checkpoint of the full tensors (written by the same converter as `erc-megatron convert`), so it
also serves as an export. Each file is written to a temporary name and renamed; `latest` is
updated only after every rank finished (barrier), so a run killed mid-save resumes from the
previous complete checkpoint and nothing half-written is ever loaded.

Adam's moments are written the same way, as fp32 checkpoints `adam_exp_avg/` and `adam_exp_avg_sq/`
shaped like the weights they belong to.

With the distributed optimizer (ZeRO-1) each rank's file holds its slices of the fp32 master weights
and Adam moments, and the layout-free folders hold them whole (assembled over data parallel), so a
checkpoint saved with it resumes without it and the other way round.

Resuming with the same layout (TP, PP, expert parallel and expert TP sizes, world size, distributed
optimizer or not) loads every rank's own file: bit-exact. With a different layout, the weights and
Adam moments are resharded from those folders (full tensors cut anew for the new TP x PP; an MoE's
experts, one tensor per expert there, dealt anew over EP and cut over expert TP), the step, Adam
step count, LR schedule and data position come from trainer.json; the RNG states start fresh (they
are per rank; a warning says so). bf16/fp16 runs also write their fp32 master weights
(`main_params/`), so nothing is rounded on the way. Nothing is unpickled: per-rank files load with
`weights_only=True`. An MoE checkpoint whose layout does not record the expert sizes (older
versions) always reshards, or is refused if it has no layout-free copy.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
MODEL_DIR = "model"
MAIN_PARAMS_DIR = "main_params"


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


def _layout(learner) -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            # which experts a rank holds, and how each is cut (1 and the TP size for a dense model)
            "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
            "expert_tensor_parallel_size": ps.get_expert_tensor_parallel_world_size(),
            # the per-rank optimizer files differ in kind with and without it
            "distributed_optimizer": bool(getattr(learner, "distributed_optimizer", False))}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _trainable(learner) -> list[torch.nn.Parameter]:
    return [p for p in learner.unwrapped.parameters() if p.requires_grad]


@contextmanager
def _params_holding(tensors: dict):
    """Let each parameter's storage be another tensor of its shape for a while, so the weight
    converters (which read and fill parameters) read or fill that tensor instead."""
    saved = {p: p.data for p in tensors}
    try:
        for p, t in tensors.items():
            p.data = t
        yield
    finally:
        for p, d in saved.items():
            p.data = d


def _save_layout_free(folder: Path, learner) -> int:
    """Collective: model/ and the Adam moments as full-tensor checkpoints; returns Adam's step count."""
    from erc_megatron.model.config import ConfigError
    from erc_megatron.patches.megatron_adam_state import MOMENTS, adam_moments, adam_step_count, main_params
    from erc_megatron.weights.checkpoint_io import save_hf_checkpoint
    from erc_megatron.weights.hf_convert import check_hf_compatible

    try:
        check_hf_compatible(learner.model_config)
    except ConfigError as exc:
        # a model built from a Hugging Face config always maps; a hand-made ModelConfig may not
        log.warning("checkpoint %s: no layout-free copy, so it resumes only on its own layout (%s)", folder, exc)
        return 0
    save_hf_checkpoint(learner.model, learner.model_config, str(folder / MODEL_DIR))
    params = _trainable(learner)
    mains = main_params(learner.optimizer, params)
    if mains:
        with _params_holding(mains):
            save_hf_checkpoint(learner.model, learner.model_config, str(folder / MAIN_PARAMS_DIR), dtype=torch.float32)
    steps = adam_step_count(learner.optimizer, params)
    # the same on every rank (a rank that owns no slice of any parameter would say 0)
    steps = _max_over_ranks(steps)
    if steps:
        for name in MOMENTS:
            # with the distributed optimizer, whole moments assembled from the data-parallel slices
            with _params_holding(adam_moments(learner.optimizer, params, name)):
                save_hf_checkpoint(learner.model, learner.model_config, str(folder / f"adam_{name}"),
                                   dtype=torch.float32)
    return steps


def _max_over_ranks(value: int) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def save_checkpoint(run_dir: str | Path, step: int, learner, trainer_state: dict, keep: int = 2) -> Path:
    """Collective: every rank writes its own file, global rank 0 the layout-free folders and trainer.json."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(run_dir) / "checkpoints"
    folder = root / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    from erc_megatron.patches.megatron_adam_state import distributed_slices

    payload = {"model": learner.model.state_dict(), "optimizer": learner.optimizer.state_dict(),
               # the distributed optimizer keeps Adam's state out of its state_dict: this rank's slices
               "optimizer_slices": distributed_slices(learner.optimizer, _trainable(learner)),
               "scheduler": learner.scheduler.state_dict(), "rng": _rng_state(), "layout": _layout(learner)}
    tmp = folder / f".rank_{rank:05d}.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, folder / f"rank_{rank:05d}.pt")
    adam_steps = _save_layout_free(folder, learner)
    if rank == 0:
        tmp = folder / ".trainer.json.tmp"
        tmp.write_text(json.dumps({**trainer_state, "step": step, "layout": _layout(learner),
                                   "scheduler": learner.scheduler.state_dict(), "adam_steps": adam_steps},
                                  indent=1))
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


def _load_scheduler(learner, state: dict) -> None:
    # megatron's scheduler load steps the schedule forward BY the saved count (it assumes a fresh
    # scheduler): from zero, loading into a learner that already stepped lands on the saved step too
    learner.scheduler.num_steps = 0
    learner.scheduler.load_state_dict(state)


def _saved_layout(layout: dict) -> dict:
    """The saved layout with the fields that older checkpoints lack: those from before the distributed
    optimizer were saved without it, those from before the expert fields were dense or EP1 x ETP=TP."""
    return {"distributed_optimizer": False, "expert_model_parallel_size": 1,
            "expert_tensor_parallel_size": layout["tensor_model_parallel_size"], **layout}


def load_checkpoint(folder: Path, learner, layout_free: bool = False) -> dict:
    """Load the checkpoint into this rank's learner; returns the trainer state (step, data position, ...).

    Same layout: this rank's own file (bit-exact resume). Different layout, or `layout_free`: weights,
    master weights and Adam moments resharded from the full-tensor folders, RNG states fresh (see the
    module docstring). Collective either way.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    trainer_state = json.loads((folder / "trainer.json").read_text())
    saved, now = _saved_layout(trainer_state["layout"]), _layout(learner)
    if learner.model_config.is_moe and "expert_model_parallel_size" not in trainer_state["layout"]:
        # saved before the layout recorded how the experts were split: its per-rank files cannot be
        # matched to this run's, the layout-free copy always can
        saved = {k: v for k, v in saved.items() if not k.startswith("expert_")}
        if not (folder / MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"checkpoint {folder} of a Mixture-of-Experts model records no expert_model_parallel_size / "
                f"expert_tensor_parallel_size in trainer.json's layout (saved by an older version) and has no "
                f"layout-free {MODEL_DIR}/ to reshard from; it cannot be resumed. Resume from a checkpoint written "
                f"by this version, or start a fresh run from an exported Hugging Face checkpoint (model.path)")
        return _load_resharded(folder, learner, trainer_state, saved, now)
    if saved != now or layout_free:
        return _load_resharded(folder, learner, trainer_state, saved, now)
    path = folder / f"rank_{rank:05d}.pt"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {folder} has no shard for rank {rank} ({path.name})")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    learner.model.load_state_dict(payload["model"])
    learner.optimizer.load_state_dict(payload["optimizer"])
    if payload.get("optimizer_slices"):
        from erc_megatron.patches.megatron_adam_state import load_distributed_slices

        load_distributed_slices(learner.optimizer, _trainable(learner), payload["optimizer_slices"])
    _load_scheduler(learner, payload["scheduler"])
    _set_rng_state(payload["rng"])
    return trainer_state


def _load_resharded(folder: Path, learner, trainer_state: dict, saved: dict, now: dict) -> dict:
    from erc_megatron.patches.megatron_adam_state import MOMENTS, adam_moments, main_params, set_adam_step_count, \
        store_adam_moments, store_main_params
    from erc_megatron.weights.checkpoint_io import load_hf_checkpoint

    model_dir = folder / MODEL_DIR
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"checkpoint {folder} was saved with layout {saved}, this run has {now}, and it "
                                f"has no layout-free {MODEL_DIR}/ to reshard from (saved by an older version, or the "
                                f"model maps to no Hugging Face architecture); resume with the saved "
                                f"tensor/pipeline/expert parallel sizes, distributed optimizer setting and world size")
    load_hf_checkpoint(learner.unwrapped, str(model_dir), learner.model_config)
    # the fp32 master copies (bf16/fp16) must follow the loaded weights: exactly from main_params/
    learner.optimizer.reload_model_params()
    params = _trainable(learner)
    mains = main_params(learner.optimizer, params, for_loading=True)
    if mains and (folder / MAIN_PARAMS_DIR).exists():
        with _params_holding(mains):
            load_hf_checkpoint(learner.unwrapped, str(folder / MAIN_PARAMS_DIR), learner.model_config)
        store_main_params(learner.optimizer, mains)
    steps = int(trainer_state.get("adam_steps", 0))
    if steps:
        for name in MOMENTS:
            # whole moments, whatever the saved layout; the distributed optimizer keeps its slices
            moments = adam_moments(learner.optimizer, params, name, for_loading=True)
            with _params_holding(moments):
                load_hf_checkpoint(learner.unwrapped, str(folder / f"adam_{name}"), learner.model_config)
            store_adam_moments(learner.optimizer, params, name, moments)
        set_adam_step_count(learner.optimizer, params, steps)
    _load_scheduler(learner, trainer_state["scheduler"])
    trainer_state["resharded_from"] = saved
    if not dist.is_initialized() or dist.get_rank() == 0:
        message = (f"resuming {folder} from its layout-free copy (saved on {saved}, now {now}): weights, Adam moments "
                   f"({steps} steps), LR schedule, step and data position resharded/restored; RNG states start "
                   f"fresh from parallel.seed (they are per rank)")
        log.warning(message)
        print(f"[erc-megatron] WARNING: {message}", flush=True)
    return trainer_state
