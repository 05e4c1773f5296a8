"""Global step statistics: accumulate locally over micro-batches, reduce once per step.

The loss and its metrics exist on the last pipeline stage only; the trainer has every other rank
add the same names with values that change no reduction (`train.update._identity_metrics`: zero
masks) and reduces over the whole world group, so every rank ends up with the same metrics. The
group is the caller's choice (`reduce_step_metrics(stats, group)`). Every metric of the step, the
loss metrics and any extra named scalars (reward mean, non-finite flags, ...), goes into at most
one all_reduce(SUM) and one all_reduce(MAX) (a min travels as the max of its negation), so
statistics never add a sync point per micro-batch.

    stats = StepStats()
    for metrics in per_microbatch_metrics:       # dicts returned by policy_loss / positive_nll_loss
        stats.add(metrics)
    stats.add_scalar("reward/mean", rewards, "mean")
    logged = reduce_step_metrics(stats, dp_cp_group)

Every rank of the group must add the same names with the same kinds (the loss functions always
return the same keys, also for micro-batches without response tokens); a mismatch of names is
detected and raised on every rank.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import torch
import torch.distributed as dist

from erc_megatron.algo.policy_loss import METRIC_REDUCTIONS as _PG_REDUCTIONS
from erc_megatron.algo.policy_loss import finalize_metrics as _pg_finalize
from erc_megatron.algo.positive_nll import METRIC_REDUCTIONS as _NLL_REDUCTIONS
from erc_megatron.algo.positive_nll import finalize_metrics as _nll_finalize

REDUCTIONS = ("sum", "max", "min", "mean")
# metrics the loss functions return, with how they reduce and how their totals are finalised
_FAMILIES = ((_PG_REDUCTIONS, _pg_finalize), (_NLL_REDUCTIONS, _nll_finalize))
KNOWN_REDUCTIONS: dict[str, str] = {k: v for table, _ in _FAMILIES for k, v in table.items()}


def _f64(value: float | torch.Tensor) -> torch.Tensor:
    t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return t.to(torch.float64)


class StepStats:
    """Local (no collectives) accumulator of one step's metrics over micro-batches."""

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}
        self._values: dict[str, torch.Tensor] = {}  # sum / max / min
        self._counts: dict[str, torch.Tensor] = {}  # element counts of "mean" entries

    def add(self, metrics: Mapping[str, torch.Tensor | float], reductions: Mapping[str, str] | None = None) -> None:
        """Fold in one micro-batch's metrics; kinds come from `reductions`, else KNOWN_REDUCTIONS."""
        for name, value in metrics.items():
            kind = (reductions or {}).get(name, KNOWN_REDUCTIONS.get(name))
            if kind is None:
                raise KeyError(f"metric {name!r} has no declared reduction: pass reductions={{{name!r}: one of "
                               f"{REDUCTIONS}}} or use add_scalar")
            self.add_scalar(name, value, kind)

    def add_scalar(self, name: str, value: torch.Tensor | float, reduce: str = "sum") -> None:
        """Add a named value (a number or a tensor of any shape) reduced by `reduce`.

        sum / max / min fold every element; mean averages every element added under `name` on
        every rank (e.g. pass the [B] rewards of each micro-batch).
        """
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce for {name!r} must be one of {REDUCTIONS}, got {reduce!r}")
        if self.kinds.setdefault(name, reduce) != reduce:
            raise ValueError(f"metric {name!r} was added with reduce={self.kinds[name]!r}, now {reduce!r}")
        t = _f64(value)
        if reduce in ("sum", "mean"):
            part = t.sum()
        elif reduce == "max":
            part = t.amax() if t.numel() else t.new_tensor(-math.inf)
        else:
            part = t.amin() if t.numel() else t.new_tensor(math.inf)
        prev = self._values.get(name)
        if prev is None:
            self._values[name] = part
        elif reduce == "max":
            self._values[name] = torch.maximum(prev, part.to(prev.device))
        elif reduce == "min":
            self._values[name] = torch.minimum(prev, part.to(prev.device))
        else:
            self._values[name] = prev + part.to(prev.device)
        if reduce == "mean":
            n = t.new_tensor(float(t.numel()))
            self._counts[name] = n if name not in self._counts else self._counts[name] + n.to(self._counts[name].device)

    def layout(self) -> tuple[list[str], list[str], list[str], list[str]]:
        """Sorted names per kind: (sum, max, min, mean); the packing order of the reduction."""
        by_kind = {k: sorted(n for n, kind in self.kinds.items() if kind == k) for k in REDUCTIONS}
        return by_kind["sum"], by_kind["max"], by_kind["min"], by_kind["mean"]


def _signature(layout: tuple[list[str], ...]) -> float:
    text = "|".join(f"{kind}:{','.join(names)}" for kind, names in zip(REDUCTIONS, layout))
    return float(zlib.crc32(text.encode()))  # < 2**32: exact in float64


def _pack_device(group: dist.ProcessGroup | None) -> torch.device:
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_step_metrics(stats: StepStats, group: dist.ProcessGroup | None = None,
                        device: torch.device | None = None) -> dict[str, float]:
    """Reduce over `group` (None: no reduction, local values) and finalise.

    Issues one all_reduce(SUM) (skipped when there is nothing to sum) and one all_reduce(MAX).
    Returns the loss families' finalised metrics (`policy_loss.finalize_metrics`,
    `positive_nll.finalize_metrics`) plus every extra scalar by its name: sums, maxima, minima, and
    means over all added elements; undefined values (means of nothing, extrema of nothing) are NaN.
    """
    sums, maxes, mins, means = layout = stats.layout()
    dev = device if device is not None else _pack_device(group)
    v = stats._values
    sum_vec = torch.stack([v[n].to(dev) for n in sums] + [v[n].to(dev) for n in means]
                          + [stats._counts[n].to(dev) for n in means]) if (sums or means) else None
    sig = _signature(layout)
    max_vec = torch.stack([v[n].to(dev) for n in maxes] + [-v[n].to(dev) for n in mins]
                          + [torch.tensor(sig, dtype=torch.float64, device=dev),
                             torch.tensor(-sig, dtype=torch.float64, device=dev)])
    if group is not None:
        if sum_vec is not None:
            dist.all_reduce(sum_vec, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(max_vec, op=dist.ReduceOp.MAX, group=group)
    sum_vals = sum_vec.tolist() if sum_vec is not None else []
    max_vals = max_vec.tolist()
    if max_vals[-2] != -max_vals[-1]:
        raise RuntimeError("ranks added different metric names or kinds to StepStats: every rank must add the "
                           f"same ones (this rank: {dict(sorted(stats.kinds.items()))})")
    totals: dict[str, float] = dict(zip(sums, sum_vals[: len(sums)]))
    totals.update(zip(maxes, max_vals[: len(maxes)]))
    totals.update((n, -x) for n, x in zip(mins, max_vals[len(maxes): len(maxes) + len(mins)]))
    mean_sums = sum_vals[len(sums): len(sums) + len(means)]
    mean_counts = sum_vals[len(sums) + len(means):]
    for n, s, c in zip(means, mean_sums, mean_counts):
        totals[n] = s / c if c > 0 else math.nan
    return _finalize(totals, stats.kinds)


def _finalize(totals: dict[str, float], kinds: Mapping[str, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    consumed: set[str] = set()
    for table, finalize in _FAMILIES:
        if all(n in totals and kinds[n] == k for n, k in table.items()):
            out.update(finalize(totals))
            consumed.update(table)
    for name, value in totals.items():
        if name in consumed:
            continue
        if name in out:
            raise ValueError(f"extra metric {name!r} collides with a finalised loss metric of the same name")
        # the identities of an empty max / min mean "nothing was added"
        empty = (kinds[name] == "max" and value == -math.inf) or (kinds[name] == "min" and value == math.inf)
        out[name] = math.nan if empty else value
    return out


__all__ = ["StepStats", "reduce_step_metrics", "KNOWN_REDUCTIONS", "REDUCTIONS"]
