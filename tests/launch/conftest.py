"""Fixtures of the launcher tests: the local Slurm cluster and a small demo model; the launch figures
are printed at the end of the run.

Without Slurm or MPI the tests that need them skip, naming the set-up command; with CI=true they
fail instead, so that CI cannot go green without having run the launchers.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.launch.common import FIGURES, LOCAL_CLUSTER, REPO, missing, slurm_dir


def _cluster(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_CLUSTER), cmd], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def stub_bin(tmp_path_factory) -> Path:
    """A PATH folder whose srun / sbatch / scontrol / nvidia-smi fail loudly: a dry run must call none."""
    d = tmp_path_factory.mktemp("stub_bin")
    for name in ("srun", "sbatch", "scontrol", "nvidia-smi"):
        (d / name).write_text(f"#!/bin/sh\necho 'dry run called {name}' >&2\nexit 99\n")
        (d / name).chmod(0o755)
    return d


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of the running local cluster (two nodes on this machine): the one CI started before
    pytest, or one started here (and stopped at the end) when Slurm is installed but not running."""
    if not all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")):
        missing("Slurm (sbatch, slurmctld, slurmd, munged)", f"bash {LOCAL_CLUSTER.relative_to(REPO)} install")
    conf = str(slurm_dir() / "etc" / "slurm.conf")
    started_here = False
    if _cluster("status").returncode != 0:
        res = _cluster("start")
        assert res.returncode == 0, f"local Slurm cluster did not start:\n{res.stdout}\n{res.stderr}"
        started_here = True
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                           env={**os.environ, "SLURM_CONF": conf}).stdout.split()
    try:
        if len(set(nodes)) < 2:
            missing(f"a 2-node local Slurm cluster (running: {sorted(set(nodes))})",
                    f"bash {LOCAL_CLUSTER.relative_to(REPO)} stop && bash {LOCAL_CLUSTER.relative_to(REPO)} start")
        yield conf
    finally:
        if started_here:
            _cluster("stop")


@pytest.fixture(scope="session")
def demo_model(small_demo) -> Path:
    """The CPU demo model (shared with the end-to-end tests)."""
    return small_demo


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("launchers (measured)")
        for line in FIGURES:
            terminalreporter.write_line(line)
