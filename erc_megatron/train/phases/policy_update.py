"""Phase 3: one optimizer step per mini-batch (loss over the mini-batch's global denominators)."""
from __future__ import annotations

import contextlib
import math
import time

from erc_megatron.model.moe_metrics import RouterStats
from erc_megatron.train.minibatch import MiniBatch
from erc_megatron.train.run import Run
from erc_megatron.train.update import update_policy


def mean_metrics(per_update: list[dict[str, float]]) -> dict[str, float]:
    """One value per metric over a step's updates: max / min / sum for counts / mean, non-finite ignored."""
    out: dict[str, float] = {}
    for key in per_update[0] if per_update else []:
        vals = [m[key] for m in per_update if isinstance(m.get(key), float) and math.isfinite(m[key])]
        if key.endswith("_max"):
            out[key] = max(vals) if vals else float("nan")
        elif key.endswith("_min"):
            out[key] = min(vals) if vals else float("nan")
        elif key in ("pg/tokens", "pg/seqs", "skipped", "updated"):
            out[key] = float(sum(vals))
        else:
            out[key] = sum(vals) / len(vals) if vals else float("nan")
    return out


def policy_update(run: Run, minibatches: list[MiniBatch], metrics: dict[str, float]) -> None:
    cfg = run.cfg
    t0 = time.perf_counter()
    updates = []
    model_cfg = run.model_cfg
    routers = RouterStats(run.learner.model, model_cfg.num_layers, model_cfg.num_moe_experts,
                          model_cfg.moe_router_topk) if model_cfg.is_moe else contextlib.nullcontext()
    with routers:
        for m in minibatches:
            den = m.denominators(cfg.loss.agg, cfg.trainer.nll_coef > 0)
            updates.append(update_policy(run.learner, m.mine, den, cfg.loss, cfg.logits, cfg.trainer.nll_coef,
                                         layout=run.layout))
    metrics.update(mean_metrics(updates))
    if model_cfg.is_moe:  # router load balance over the update's forward passes
        metrics.update(routers.summarise())
    metrics["time/update"] = time.perf_counter() - t0
