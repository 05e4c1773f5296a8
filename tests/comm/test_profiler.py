"""The communication profiler: step windows, roles from megatron's groups, phases, async timing and
the written report on real gloo ranks (one 2-process launch); the report's arithmetic, the trace
format, the CLI and the hooks' refusal of a changed torch without processes.

The profile of a whole TP2 x PP2 training step (megatron's own collectives, the log-prob op's
all-gather, statistics, pipeline p2p, weight sync) is checked in tests/train/test_train_e2e.py."""
from __future__ import annotations

import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from erc_megatron.comm import comm_phase
from erc_megatron.comm.report import build_profile, chrome_trace, format_table, write_outputs
from erc_megatron.model.config import ConfigError
from erc_megatron.patches import torch_distributed_hooks as hooks
from tests.distributed import run_distributed

SLEEP = 0.05


def _worker(rank, world_size, out_dir):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import mappings

    from erc_megatron.comm import CommProfiler, start_comm_profiler

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    original = dist.all_reduce
    seen = {}

    off = start_comm_profiler(out_dir, profile_comm=False, profile_steps=[], last_step=2)
    off.begin_step(1)
    seen["off_installed"] = hooks.installed() or dist.all_reduce is not original
    seen["off_phase_null"] = comm_phase("old_policy") is comm_phase("optimizer")
    off.end_step()

    prof = CommProfiler(out_dir, steps=[2], extra_roles={}, say=lambda *_: None)
    prof.begin_step(1)  # not chosen: nothing installed, nothing recorded
    seen["step1_installed"] = hooks.installed()
    dist.all_reduce(torch.ones(3))
    prof.end_step()

    prof.begin_step(2)
    seen["step2_installed"] = hooks.installed() and dist.all_reduce is not original
    x = torch.ones(5, 3)
    with comm_phase("forward_backward", micro_batches=1, micro_batch_shape=[5, 3]):
        mappings.reduce_from_tensor_model_parallel_region(x)          # megatron: all_reduce on TP
        # megatron's import-time binding of all_gather_into_tensor, seen as all_gather_single
        mappings.dist_all_gather_func(torch.empty(10, 3), x, group=ps.get_tensor_model_parallel_group())
        with comm_phase("statistics", role="statistics"):
            dist.all_reduce(torch.ones(7, dtype=torch.float64))       # world group, statistics role
    dist.barrier()                                                    # outside any phase
    with comm_phase("weight_sync"):
        peer = 1 - rank
        if rank == 0:
            time.sleep(SLEEP)  # rank 1's irecv is posted and waiting first, so its wait exposes the transfer
            work = dist.isend(torch.ones(11), peer)
            time.sleep(SLEEP)  # overlapped "compute" before the wait
            work.wait()
        else:
            work = dist.irecv(torch.empty(11), peer)
            work.wait()
        work = dist.all_reduce(torch.ones(2), async_op=True)
        time.sleep(SLEEP)
        work.wait()
    prof.end_step()  # last chosen step: gathers and writes the report on rank 0
    seen["after_installed"] = hooks.installed() or dist.all_reduce is not original
    seen["written"] = prof.written
    seen["events"] = prof._events
    seen["steps"] = prof._step_records
    seen["tp_group"] = ps.get_tensor_model_parallel_group().group_name
    return seen


@pytest.mark.e2e
def test_profiler_records_chosen_step_with_roles_phases_and_async_overlap(tmp_path):
    res = run_distributed(_worker, 2, args=(str(tmp_path),))
    for rank, r in enumerate(res):
        assert not r["off_installed"] and r["off_phase_null"]
        assert not r["step1_installed"] and r["step2_installed"] and not r["after_installed"]
        ev = r["events"]
        got = [(e["op"], e["role"], e["phase"], e["bytes_in"], e["bytes_out"]) for e in ev]
        p2p = ("isend", "PP", "weight_sync", 44, 0) if rank == 0 else ("irecv", "PP", "weight_sync", 0, 44)
        assert got == [
            ("all_reduce", "TP", "forward_backward", 60, 60),
            ("all_gather_single", "TP", "forward_backward", 60, 120),
            ("all_reduce", "statistics", "statistics", 56, 56),
            ("barrier", "world", "other", 0, 0),
            (p2p[0], "world", "weight_sync", p2p[3], p2p[4]),
            ("all_reduce", "world", "weight_sync", 8, 8),
        ], got
        assert all(e["step"] == 2 and e["dur_s"] >= e["issue_s"] >= 0 for e in ev)
        assert ev[0]["group"].startswith(f"pg{r['tp_group']}[")
        # blocking calls hide nothing; the async ones were waited on, so their overlap is measured
        assert all(e["hidden_s"] == 0.0 for e in ev if not e["async"])
        send = ev[4]
        if rank == 0:  # isend completes only at the wait, after the sleep: the sleep overlapped it
            assert send["dur_s"] >= SLEEP and send["hidden_s"] >= 0.8 * SLEEP, send
        else:  # irecv waited on at once: exposed, not hidden
            assert send["hidden_s"] <= 0.5 * send["dur_s"] + 1e-3, send
        ar = ev[5]
        assert ar["async"] and ar["hidden_s"] is not None and 0 <= ar["hidden_s"] <= ar["dur_s"]
        (step,) = r["steps"]
        assert step["step"] == 2 and step["seconds"] >= SLEEP
        assert step["phases"]["forward_backward"]["attrs"] == [{"micro_batches": 1, "micro_batch_shape": [5, 3]}]
        assert set(step["phases"]) == {"forward_backward", "statistics", "weight_sync"}
    assert res[0]["written"] == str(tmp_path / "comm_profile.json") and res[1]["written"] == ""
    stored = json.loads((tmp_path / "comm_profile.json").read_text())
    assert [r["rank"] for r in stored["ranks"]] == [0, 1]
    assert stored["ranks"][1]["events"] == json.loads(json.dumps(res[1]["events"]))
    assert (tmp_path / "comm_profile.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "comm_trace.json").read_text())["traceEvents"]


def _event(step, op, role, phase, nbytes, start, dur, asynchronous=False, hidden=0.0):
    return {"step": step, "phase": phase, "role": role, "op": op, "group": "pg1[0,1]", "group_size": 2,
            "bytes": nbytes, "bytes_in": nbytes, "bytes_out": nbytes, "start": start, "issue_s": dur / 2 if asynchronous
            else dur, "async": asynchronous, "dur_s": dur, "hidden_s": hidden if asynchronous else 0.0}


def _synthetic():
    t = 1000.0
    ranks = []
    for rank in range(2):
        steps = [{"step": s, "start": t + 10 * s, "seconds": 2.0,
                  "phases": {"old_policy": {"seconds": 0.5, "spans": [[t + 10 * s, 0.5]], "attrs": []}}}
                 for s in (1, 2)]
        events = [_event(1, "all_reduce", "TP", "old_policy", 1000, t + 10.1, 0.1),
                  _event(1, "all_reduce", "TP", "old_policy", 3000, t + 10.2, 0.3),
                  _event(2, "batch_isend_irecv", "PP", "forward_backward", 500, t + 20.1, 0.4, True, 0.1 * (rank + 1)),
                  _event(2, "all_reduce", "statistics", "statistics", 64, t + 20.6, 0.2)]
        ranks.append({"rank": rank, "steps": steps, "events": events})
    return ranks


def test_report_arithmetic_table_and_trace(tmp_path, capsys):
    profile = build_profile(_synthetic())
    step_total = 2 * 2 * 2.0  # 2 ranks x 2 steps x 2 s
    assert profile["merged"]["step_seconds_all_ranks"] == step_total
    rows = {(r["role"], r["op"]): r for r in profile["merged"]["table"]}
    assert [(r["role"], r["op"]) for r in profile["merged"]["table"]] == [
        ("TP", "all_reduce"), ("PP", "batch_isend_irecv"), ("statistics", "all_reduce")]
    tp = rows[("TP", "all_reduce")]
    assert (tp["count"], tp["bytes"]) == (4, 8000) and tp["seconds"] == pytest.approx(0.8)
    assert tp["bandwidth_Bps"] == pytest.approx(8000 / 0.8) and tp["share_of_step"] == pytest.approx(0.8 / step_total)
    assert tp["hidden_share"] is None
    pp = rows[("PP", "batch_isend_irecv")]
    assert pp["hidden_share"] == pytest.approx((0.1 + 0.2) / 0.8)
    per_step = profile["merged"]["per_step"]
    assert per_step["1"] == {"step_seconds": 2.0, "comm": {"old_policy/TP": pytest.approx(0.4)}}
    assert per_step["2"]["comm"] == {"forward_backward/PP": pytest.approx(0.4), "statistics/statistics": pytest.approx(0.2)}
    assert profile["merged"]["phases"]["old_policy"] == {"wall_seconds": 2.0, "comm_seconds": pytest.approx(0.8)}

    table = format_table(profile)
    lines = table.splitlines()
    assert lines[0].split() == ["group", "op", "count", "bytes", "time", "bandwidth", "of", "step", "hidden"]
    assert lines[2].split() == ["TP", "all_reduce", "4", "8.0", "kB", "800.0", "ms", "10.0", "kB/s", "10.0%", "-"]
    assert lines[3].split()[-1] == "37.5%"
    assert any(line.split()[:3] == ["total", "8", "9.1"] for line in lines), table

    trace = chrome_trace(profile)
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in xs} == {0, 1}
    first = min(xs, key=lambda e: e["ts"])
    assert first["ts"] == 0 and first["name"] == "step 1"
    ar = next(e for e in xs if e["name"] == "all_reduce TP" and e["pid"] == 1)
    assert ar["ts"] == pytest.approx(0.1 * 1e6) and ar["dur"] == pytest.approx(0.1 * 1e6) and ar["tid"] == 1
    assert next(e for e in xs if e["cat"] == "PP")["tid"] == 2  # async calls on their own track
    assert {e["name"] for e in trace["traceEvents"] if e["ph"] == "M"} >= {"process_name", "thread_name"}

    paths, _ = write_outputs(profile, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["comm_profile.json", "comm_profile.png", "comm_trace.json"]
    (tmp_path / "comm_profile.png").unlink()
    from erc_megatron.cli import main

    assert main(["profile-comm", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(table)
    assert (tmp_path / "comm_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="trainer.profile_comm=true"):
        main(["profile-comm", str(tmp_path / "nothing")])


def test_hooks_refuse_a_changed_torch_function_and_install_nothing(monkeypatch):
    def all_reduce(tensor, grp=None, async_op=False):  # "group" renamed
        return None

    monkeypatch.setattr(c10d, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(hooks.TorchInternalsChangedError,
                       match=r"torch\.distributed\.all_reduce no longer takes \['group'\] in torch .*checked against "
                             r"torch 2\.13\.0"):
        hooks.add_listener(object())
    assert not hooks.installed() and dist.all_reduce is all_reduce


def test_profile_steps_validation_names_the_field():
    from erc_megatron.train.config import TrainerConfig

    assert TrainerConfig(steps=3, profile_comm=True, profile_steps=[1, 3]).profile_steps == [1, 3]
    for bad in ([0], [4], [2, 2]):
        with pytest.raises(ConfigError, match=r"trainer\.profile_steps must be distinct step numbers in "
                                              r"1\.\.trainer\.steps \(3\), got \[" + ", ".join(map(str, bad))):
            TrainerConfig(steps=3, profile_steps=bad)
