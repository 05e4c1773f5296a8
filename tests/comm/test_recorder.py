"""record_collectives on real gloo ranks (one 2-process launch) and its patch/restore contract."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from erc_megatron.comm import COLLECTIVE_OPS, GroupId, record_collectives
from tests.distributed import run_distributed


def _originals():
    return {(m.__name__, n): getattr(m, n) for n in COLLECTIVE_OPS for m in (dist, c10d) if hasattr(m, n)}


def _worker(rank, world_size):
    from megatron.core.tensor_parallel import mappings  # binds all_gather_into_tensor now, unpatched

    peer = 1 - rank
    sub = dist.new_group([0, 1])  # a second group over the same ranks: must be told apart
    solo = [dist.new_group([0]), dist.new_group([1])][rank]
    world_id = GroupId(dist.group.WORLD.group_name, (0, 1))
    originals = _originals()

    with record_collectives() as outer:
        t = torch.ones(10)
        dist.all_reduce(t)                                        # 40 B on WORLD
        with record_collectives() as inner:
            out = torch.empty(2 * 6)
            dist.all_gather_into_tensor(out, torch.ones(6), group=sub)      # in 24, out 48 on sub
            lst = [torch.empty(3), torch.empty(3)]
            dist.all_gather(lst, torch.full((3,), float(rank)), group=sub)  # in 12, out 24
            objs = [None, None]
            dist.all_gather_object(objs, {"rank": rank})
        dist.broadcast(torch.ones(5), src=0)                      # 20
        rs = torch.empty(4)
        dist.reduce_scatter_tensor(rs, torch.ones(8))             # in 32, out 16
        a2a = torch.empty(6)
        dist.all_to_all_single(a2a, torch.ones(6))                # 24
        dist.barrier()
        if rank == 0:
            dist.send(torch.ones(7), dst=1)
        else:
            dist.recv(torch.empty(7), src=0)                      # 28
        ops = [dist.P2POp(dist.isend, torch.ones(3), peer), dist.P2POp(dist.irecv, torch.empty(3), peer)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        work = dist.all_reduce(torch.ones(2), async_op=True)
        work.wait()
        dist.all_reduce(torch.ones(4), group=solo)                # a one-rank group
        # a collective from another thread while recording is on
        th = threading.Thread(target=lambda: dist.all_reduce(torch.ones(1), group=sub))
        th.start()
        th.join()
        # megatron-core calls torch.distributed.all_reduce by attribute at call time and binds
        # all_gather_into_tensor at import: both must be seen
        mappings._reduce(torch.ones(3), sub)
        mappings.dist_all_gather_func(torch.empty(8), torch.ones(4), group=sub)
        # while recording, both module names hold the same wrapper
        same = all(getattr(dist, n) is getattr(c10d, n) for n in COLLECTIVE_OPS if hasattr(dist, n))
        patched = dist.all_reduce is not originals[("torch.distributed", "all_reduce")]

    restored = _originals() == originals
    ev = outer.events
    return dict(
        ops=[e.op for e in ev], inner_ops=[e.op for e in inner.events],
        sizes={e.op: (e.bytes_in, e.bytes_out) for e in ev if e.op != "all_reduce"},
        reduce_sizes=[(e.nbytes, e.group.size, e.async_op) for e in ev if e.op == "all_reduce"],
        obj=[(e.bytes_in, e.bytes_out) for e in ev if e.op == "all_gather_object"][0],
        p2p=[(e.bytes_in, e.bytes_out, e.async_op) for e in ev if e.op == "batch_isend_irecv"][0],
        count_world=outer.count(group=dist.group.WORLD), count_world_id=outer.count(group=world_id),
        count_sub=outer.count(group=sub), count_sub_name=outer.count(group=sub.group_name),
        bytes_sub_ag=outer.total_bytes("all_gather_into_tensor", group=sub),
        summary=outer.summary(), table=outer.format_summary(), same=same, patched=patched, restored=restored,
    )


@pytest.mark.e2e
def test_records_every_collective_with_bytes_groups_and_nesting():
    res = run_distributed(_worker, 2)
    for rank, r in enumerate(res):
        assert r["same"] and r["patched"] and r["restored"], r
        expect_inner = ["all_gather_into_tensor", "all_gather", "all_gather_object"]
        assert r["inner_ops"] == expect_inner
        p2p_op = "send" if rank == 0 else "recv"
        assert r["ops"] == (["all_reduce"] + expect_inner
                            + ["broadcast", "reduce_scatter_tensor", "all_to_all_single", "barrier", p2p_op,
                               "batch_isend_irecv", "all_reduce", "all_reduce", "all_reduce",
                               "all_reduce", "all_gather_single"]), r["ops"]
        s = r["sizes"]
        assert s["all_gather_into_tensor"] == (24, 48)
        assert s["all_gather"] == (12, 24)
        assert s["broadcast"] == (20, 20)
        assert s["reduce_scatter_tensor"] == (32, 16)
        assert s["all_to_all_single"] == (24, 24)
        assert s["barrier"] == (0, 0)
        assert s[p2p_op] == ((28, 0) if rank == 0 else (0, 28))
        assert s["all_gather_single"] == (16, 32)  # megatron's import-time binding, seen through c10d
        # world (10 floats), async world, one-rank group, the other thread's on sub, megatron's on sub
        assert r["reduce_sizes"] == [(40, 2, False), (8, 2, True), (16, 1, False), (4, 2, False), (12, 2, False)]
        # object collective: sized by the tensor traffic it issues (a size exchange and the payload)
        assert r["obj"][0] > 8 and r["obj"][1] == 2 * r["obj"][0]
        assert r["p2p"] == (12, 12, True)
        assert r["count_world"] == r["count_world_id"] == 9
        assert r["count_sub"] == r["count_sub_name"] == 5
        assert r["bytes_sub_ag"] == 48
        summ = r["summary"]
        assert summ["by_op"]["all_reduce"]["count"] == 5
        assert summ["total"]["all"]["count"] == len(r["ops"])
        assert sum(v["count"] for v in summ["by_group"].values()) == len(r["ops"])
        assert "all_gather_object" in r["table"] and "total" in r["table"]


def test_patches_restored_on_exit_even_after_an_error():
    before = _originals()
    try:
        with record_collectives():
            with record_collectives():
                assert dist.all_reduce is c10d.all_reduce is not before[("torch.distributed", "all_reduce")]
                raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert _originals() == before


def test_patch_added_on_top_is_left_alone():
    before = _originals()
    def my_all_reduce(*a, **k):  # someone else's patch, installed while we record
        return None

    with record_collectives():
        dist.all_reduce = my_all_reduce
    assert dist.all_reduce is my_all_reduce
    dist.all_reduce = before[("torch.distributed", "all_reduce")]
    assert _originals() == before
