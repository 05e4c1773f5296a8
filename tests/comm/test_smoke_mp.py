import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

pytestmark = pytest.mark.e2e  # multi-process launches


def _worker(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def test_run_distributed_sums_over_ranks():
    assert run_distributed(_worker, 2) == [3.0, 3.0]
