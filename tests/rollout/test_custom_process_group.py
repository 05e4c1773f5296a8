"""patches/custom_process_group.py: a second gloo group next to the default one, and the
version checks on torch's private helper."""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from erc_megatron.patches import custom_process_group as cpg
from tests.distributed import free_port, run_distributed


def _worker(rank, world_size, port):
    # Custom-group ranks run opposite to default-group ranks, so group rank 0 is default rank 1.
    group_rank = world_size - 1 - rank
    pg = cpg.init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", world_size, group_rank,
                                       "erc_test_weight_group", timeout=timedelta(seconds=60))
    payload = torch.tensor([3.5, -1.25, float(rank)]) if group_rank == 0 else torch.zeros(3)
    dist.broadcast(payload, src=0, group=pg)
    summed_custom = torch.tensor([float(group_rank) + 1.0])
    dist.all_reduce(summed_custom, group=pg)
    summed_default = torch.tensor([float(rank) * 10.0])
    dist.all_reduce(summed_default)
    shape = (pg.size(), pg.rank(), pg is not dist.group.WORLD)
    cpg.destroy_custom_process_group(pg)
    after = torch.ones(1)
    dist.all_reduce(after)  # the default group survives the custom group's teardown
    name_free = "erc_test_weight_group" not in c10d._world.pg_names.values()
    return payload.tolist(), summed_custom.item(), summed_default.item(), shape, after.item(), name_free


@pytest.mark.e2e
def test_custom_group_alongside_default_group():
    results = run_distributed(_worker, 2, args=(free_port(),))
    root_default_rank = 1  # group rank 0
    for rank, (payload, custom, default, shape, after, name_free) in enumerate(results):
        assert payload == [3.5, -1.25, float(root_default_rank)]
        assert custom == 3.0 and default == 10.0 and after == 2.0
        assert shape == (2, 1 - rank, True)
        assert name_free


def test_helper_signature_variants(monkeypatch):
    assert cpg._helper_options_name() == "backend_options"  # torch 2.6+ spelling (2.13 here)

    def pg_options_variant(group_size, group_rank, global_ranks_in_group, backend, store, group_name,
                           pg_options=None, timeout=None, pg_tag=None, device_id=None, group_desc=None):
        raise AssertionError("not called")

    monkeypatch.setattr(c10d, "_new_process_group_helper", pg_options_variant)
    assert cpg._helper_options_name() == "pg_options"  # torch <= 2.5 spelling


@pytest.mark.parametrize("variant", ["reordered", "no_options", "missing"])
def test_changed_helper_fails_loudly_naming_torch_version(monkeypatch, variant):
    def reordered(world_size, rank, ranks, backend, store, group_name, backend_options=None, timeout=None):
        raise AssertionError("not called")

    def no_options(group_size, group_rank, global_ranks_in_group, backend, store, group_name, timeout=None):
        raise AssertionError("not called")

    if variant == "missing":
        monkeypatch.delattr(c10d, "_new_process_group_helper")
    else:
        fake = {"reordered": reordered, "no_options": no_options}[variant]
        monkeypatch.setattr(c10d, "_new_process_group_helper", fake)
    with pytest.raises(cpg.TorchInternalsChangedError) as info:
        cpg.init_custom_process_group("gloo", f"tcp://127.0.0.1:{free_port()}", 1, 0, "never_created")
    assert torch.__version__ in str(info.value) and "_new_process_group_helper" in str(info.value)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(init_method="env://"), "tcp://HOST:PORT"),
    (dict(rank=2), "0 <= rank < world_size"),
    (dict(group_name=""), "group_name"),
])
def test_bad_arguments(kwargs, needle):
    args = dict(backend="gloo", init_method="tcp://127.0.0.1:1", world_size=2, rank=0, group_name="g")
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        cpg.init_custom_process_group(**args)
