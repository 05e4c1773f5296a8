"""Both ops on real gloo ranks: TP=4 (one group of 4) and TP=2 (groups {0,2} and {1,3}, so group
rank order differs from global rank order), all in ONE 4-process launch.

Each rank feeds its vocabulary shard and compares with a float64 reference on the full tensors
(see checks.py for the cases and tolerances); collectives are counted with the recorder.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.ops.checks import all_cases, run_fused_case, run_logits_case

pytestmark = pytest.mark.e2e  # multi-process launches


def _seed() -> int:
    return int(os.environ.get("ERC_TEST_SEED", "1234"))


def _worker(rank, world_size, seed):
    torch.manual_seed(seed + rank)
    tp4 = dist.new_group([0, 1, 2, 3])
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank creates every group
    tp2 = pairs[rank % 2]
    done = 0
    for tp, group in ((4, tp4), (2, tp2)):
        group_rank = dist.get_rank(group)
        # same seed within a TP group (same rows), different across the two TP=2 groups
        base = seed + 1000 * tp + (rank % 2 if tp == 2 else 0)
        for case in all_cases(base, tp, local=7, shape=(3, 5)):
            run_logits_case(case, group_rank, group)
            done += 1
        for case in all_cases(base + 500, tp, local=6, shape=(2, 5), hidden=5):
            run_fused_case(case, group_rank, group)
            done += 1
    return done


def test_ops_match_float64_reference_at_tp4_and_tp2():
    seed = _seed()
    try:
        done = run_distributed(_worker, 4, args=(seed,))
    except AssertionError as err:
        raise AssertionError(f"reproduce with ERC_TEST_SEED={seed}\n{err}") from None
    assert all(n == done[0] and n > 0 for n in done), (done, f"seed={seed}")
