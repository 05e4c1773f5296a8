"""comm_profile.png: where each profiled step's communication time went, and what bandwidth it got.

Left: per step, the mean over ranks of communication time, stacked by (phase, group role), with
the step's mean wall time as a marker. Right: effective bandwidth (bytes / duration) of every
blocking call against its message size, one colour per role (async calls are left out: their
duration includes time spent overlapped with other work).
"""
from __future__ import annotations

from erc_megatron.comm.profiler import PHASES, ROLES


def plot_profile(profile: dict, out_path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_step = profile["merged"]["per_step"]
    steps = sorted(per_step, key=int)
    keys = sorted({k for s in steps for k in per_step[s]["comm"]},
                  key=lambda k: (PHASES.index(k.split("/")[0]) if k.split("/")[0] in PHASES else len(PHASES),
                                 ROLES.index(k.split("/")[1]) if k.split("/")[1] in ROLES else len(ROLES)))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=80, gridspec_kw={"wspace": 0.75})
    cmap = plt.get_cmap("tab20")
    bottom = [0.0] * len(steps)
    for i, key in enumerate(keys):
        vals = [per_step[s]["comm"].get(key, 0.0) * 1e3 for s in steps]
        ax.bar(steps, vals, bottom=bottom, label=key, color=cmap(i % 20))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(steps, [per_step[s]["step_seconds"] * 1e3 for s in steps], "k_", markersize=30, mew=2,
            label="step wall time")
    ax.set_xlabel("step")
    ax.set_ylabel("ms per rank (mean over ranks)")
    ax.set_title("communication time by phase / group")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))

    by_role: dict[str, tuple[list, list]] = {}
    for r in profile["ranks"]:
        for e in r["events"]:
            if e["async"] or e["bytes"] <= 0 or e["dur_s"] <= 0:
                continue
            xs, ys = by_role.setdefault(e["role"], ([], []))
            xs.append(e["bytes"])
            ys.append(e["bytes"] / e["dur_s"] / 1e6)
    for i, role in enumerate(sorted(by_role, key=lambda r: ROLES.index(r) if r in ROLES else len(ROLES))):
        xs, ys = by_role[role]
        bx.scatter(xs, ys, s=8, alpha=0.6, label=role, color=plt.get_cmap("tab10")(i % 10))
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("message size (bytes)")
    bx.set_ylabel("effective bandwidth (MB/s)")
    bx.set_title("bandwidth vs message size (blocking calls)")
    if by_role:
        bx.legend(fontsize=7)
    fig.savefig(out_path, bbox_inches="tight")
    plt.close(fig)
    return out_path
