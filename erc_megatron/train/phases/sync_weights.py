"""Phase 4: the updated weights to the rollout servers, under the next weight version."""
from __future__ import annotations

import time

from erc_megatron.comm import comm_phase
from erc_megatron.train.run import LoopState, Run


def sync_weights(run: Run, state: LoopState, metrics: dict[str, float]) -> None:
    t0 = time.perf_counter()
    state.weight_version += 1
    with comm_phase("weight_sync"):
        run.sync.sync(state.weight_version)
    metrics["time/weight_sync"] = time.perf_counter() - t0
    metrics["weight_version"] = float(state.weight_version)
