"""The communication profile's files, from every rank's events; and `erc-megatron profile-comm RUN_DIR`.

Files written under the run directory:
- comm_profile.json: {"ranks": [per-rank steps and events], "merged": {"table": ..., "phases": ...,
  "per_step": ...}} (`build_profile`);
- comm_profile.png: per step, communication time stacked by phase and group role; bandwidth
  against message size (`erc_megatron.comm.plot`);
- comm_trace.json: Chrome / Perfetto trace (chrome://tracing, ui.perfetto.dev), one process per
  rank with a phases track, a blocking-calls track and an async-calls track (`chrome_trace`).

All times in the merged tables are summed over ranks: "share of step" is a (role, op)'s time over
the sum of every rank's step time, i.e. the average fraction of a rank's step spent in it.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

from erc_megatron.comm.profiler import PHASES, ROLES, load_profile

FILES = ("comm_profile.json", "comm_profile.png", "comm_trace.json")


def _order(values, known) -> list:
    return sorted(values, key=lambda v: (known.index(v) if v in known else len(known), v))


def build_profile(every_rank: list[dict], timer: str = "WallTimer") -> dict:
    """The JSON document: every rank's raw record plus tables merged over ranks."""
    ranks = sorted(every_rank, key=lambda r: r["rank"])
    events = [dict(e, rank=r["rank"]) for r in ranks for e in r["events"]]
    step_total = sum(s["seconds"] for r in ranks for s in r["steps"])
    rows: dict[tuple[str, str], dict] = {}
    for e in events:
        row = rows.setdefault((e["role"], e["op"]), {"role": e["role"], "op": e["op"], "count": 0, "bytes": 0,
                                                     "seconds": 0.0, "async_seconds": 0.0, "hidden_seconds": 0.0,
                                                     "measured_async": 0})
        row["count"] += 1
        row["bytes"] += e["bytes"]
        row["seconds"] += e["dur_s"]
        if e["async"] and e.get("hidden_s") is not None:
            row["measured_async"] += 1
            row["async_seconds"] += e["dur_s"]
            row["hidden_seconds"] += e["hidden_s"]
    table = []
    for role in _order({k[0] for k in rows}, ROLES):
        for row in sorted((v for k, v in rows.items() if k[0] == role), key=lambda v: -v["seconds"]):
            row["bandwidth_Bps"] = row["bytes"] / row["seconds"] if row["seconds"] > 0 else None
            row["share_of_step"] = row["seconds"] / step_total if step_total > 0 else None
            row["hidden_share"] = (row["hidden_seconds"] / row["async_seconds"]
                                   if row["measured_async"] and row["async_seconds"] > 0 else None)
            table.append(row)
    per_step: dict[int, dict] = defaultdict(lambda: {"step_seconds": 0.0, "comm": defaultdict(float)})
    for r in ranks:
        for s in r["steps"]:
            per_step[s["step"]]["step_seconds"] += s["seconds"] / len(ranks)
    for e in events:
        per_step[e["step"]]["comm"][f"{e['phase']}/{e['role']}"] += e["dur_s"] / len(ranks)
    phases: dict[str, dict] = defaultdict(lambda: {"wall_seconds": 0.0, "comm_seconds": 0.0})
    for r in ranks:
        for s in r["steps"]:
            for name, p in s["phases"].items():
                phases[name]["wall_seconds"] += p["seconds"]
    for e in events:
        phases[e["phase"]]["comm_seconds"] += e["dur_s"]
    return {
        "version": 1, "timer": timer, "world_size": len(ranks),
        "steps": sorted({s["step"] for r in ranks for s in r["steps"]}),
        "ranks": ranks,
        "merged": {
            "step_seconds_all_ranks": step_total,
            "table": table,
            "phases": {k: phases[k] for k in _order(phases, PHASES)},
            "per_step": {str(k): {"step_seconds": v["step_seconds"], "comm": dict(v["comm"])}
                         for k, v in sorted(per_step.items())},
        },
    }


def _si(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(profile: dict) -> str:
    """Per role and op over every rank and profiled step; then per phase."""
    m = profile["merged"]
    head = ("group", "op", "count", "bytes", "time", "bandwidth", "of step", "hidden")
    rows = [head]
    for r in m["table"]:
        rows.append((r["role"], r["op"], str(r["count"]), _si(r["bytes"], "B"), f"{r['seconds'] * 1e3:.1f} ms",
                     _si(r["bandwidth_Bps"], "B/s"), _pct(r["share_of_step"]), _pct(r["hidden_share"])))
    total_s = sum(r["seconds"] for r in m["table"])
    total_share = total_s / m["step_seconds_all_ranks"] if m["step_seconds_all_ranks"] else None
    rows.append(("total", "", str(sum(r["count"] for r in m["table"])), _si(sum(r["bytes"] for r in m["table"]), "B"),
                 f"{total_s * 1e3:.1f} ms", "", _pct(total_share), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    phase_rows = [("phase", "wall", "comm", "comm/wall")]
    for name, p in m["phases"].items():
        phase_rows.append((name, f"{p['wall_seconds'] * 1e3:.1f} ms", f"{p['comm_seconds'] * 1e3:.1f} ms",
                           _pct(p["comm_seconds"] / p["wall_seconds"]) if p["wall_seconds"] > 0 else "-"))
    pw = [max(len(r[i]) for r in phase_rows) for i in range(4)]
    lines += ["", *("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, pw)))
                    for r in phase_rows)]
    ranks, steps = profile["world_size"], profile["steps"]
    lines.append(f"(summed over {ranks} ranks and steps {steps}; time = {profile['timer']}; "
                 "hidden = share of async-op time overlapped with other work)")
    return "\n".join(lines)


def chrome_trace(profile: dict) -> dict:
    """Trace Event Format: "X" events, microseconds, pid = rank; tid 0 phases, 1 blocking, 2 async."""
    starts = [e["start"] for r in profile["ranks"] for e in r["events"]]
    starts += [s["start"] for r in profile["ranks"] for s in r["steps"]]
    t0 = min(starts) if starts else 0.0
    us = lambda t: round((t - t0) * 1e6, 3)  # noqa: E731
    out = []
    for r in profile["ranks"]:
        pid = r["rank"]
        out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"rank {pid}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        for tid, name in ((0, "steps / phases"), (1, "collectives"), (2, "async collectives")):
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
        for s in r["steps"]:
            out.append({"ph": "X", "name": f"step {s['step']}", "cat": "step", "pid": pid, "tid": 0,
                        "ts": us(s["start"]), "dur": round(s["seconds"] * 1e6, 3)})
            for name, p in s["phases"].items():
                for start, seconds in p["spans"]:
                    out.append({"ph": "X", "name": name, "cat": "phase", "pid": pid, "tid": 0, "ts": us(start),
                                "dur": round(seconds * 1e6, 3), "args": {"step": s["step"]}})
        for e in r["events"]:
            out.append({"ph": "X", "name": f"{e['op']} {e['role']}", "cat": e["role"], "pid": pid,
                        "tid": 2 if e["async"] else 1, "ts": us(e["start"]), "dur": round(e["dur_s"] * 1e6, 3),
                        "args": {"bytes": e["bytes"], "group": e["group"], "phase": e["phase"], "step": e["step"],
                                 "issue_us": round(e["issue_s"] * 1e6, 3), "hidden_us":
                                 None if e.get("hidden_s") is None else round(e["hidden_s"] * 1e6, 3)}})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_outputs(profile: dict, run_dir: str, json_too: bool = True) -> tuple[list[str], str]:
    """Write the files (the JSON only with `json_too`); returns (paths, the text table)."""
    from erc_megatron.comm.plot import plot_profile

    os.makedirs(run_dir, exist_ok=True)
    paths = [os.path.join(run_dir, f) for f in FILES]
    if json_too:
        _dump(profile, paths[0])
    plot_profile(profile, paths[1])
    _dump(chrome_trace(profile), paths[2])
    return paths, format_table(profile)


def _dump(obj: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory holding comm_profile.json (trainer.profile_comm=true)")
    parser.add_argument("--out-dir", default=None, help="where to write the PNG and trace (default: run_dir)")


def run(args: argparse.Namespace) -> int:
    stored = load_profile(args.run_dir)
    profile = build_profile(stored["ranks"], timer=stored.get("timer", "WallTimer"))
    out_dir = args.out_dir or (args.run_dir if os.path.isdir(args.run_dir) else os.path.dirname(args.run_dir))
    paths, table = write_outputs(profile, out_dir, json_too=False)
    print(table)
    print(f"wrote {paths[1]} and {paths[2]}")
    return 0
