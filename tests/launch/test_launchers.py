"""The real launchers, each running the same 3-step CPU ERC-DAPO training (TP=2 x PP=2, 4 ranks, the
embedded rollout server on the learner's node):
- `sbatch launch/slurm/erc_train.sbatch` on the local single-node Slurm cluster
  (launch/slurm/local_cluster.sh): srun starts the 4 ranks, which read SLURM_* themselves;
- `launch/mpirun.sh 4` (Open MPI as root, oversubscribed): rank 0 picks the rendezvous and mpi4py
  broadcasts it.
Each must finish with exit code 0 (for Slurm: `scontrol show job` and the job-completion log;
there is no slurmdbd, so no `sacct`), log all 3 steps, and say which launcher started its ranks. The two runs are
deterministic and must log the same learning figures. Seconds from submission to the first step are
printed in the terminal summary.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed import free_port
from tests.launch.common import FIGURES, REPO, missing

CONFIG = REPO / "examples" / "cpu_demo.yaml"
STEPS = 3
RANKS = 4  # TP=2 x PP=2 from the recipe: 4 tasks on a 2-core machine
TIMEOUT = 420
STEP_KEYS = ("rollout/reward_mean", "rollout/accuracy", "erc/in_band_frac", "erc/rho_mean", "entropy/mean",
             "pg/loss", "grad_norm", "weight_version")


def _overrides(demo: Path, run_dir: Path) -> list[str]:
    return [f"model.path={demo / 'model'}", f"data.train_path={demo / 'train.jsonl'}",
            f"data.val_path={demo / 'val.jsonl'}", f"trainer.run_dir={run_dir}", f"trainer.steps={STEPS}",
            "trainer.save_every=0", "trainer.prompts_per_step=4", "trainer.prompts_per_minibatch=2",
            "trainer.micro_batch_size=4", "rollout.n_samples_per_prompt=4", "validation.every_steps=0"]


def _env(**extra: str) -> dict[str, str]:
    # the job's `python` must be this interpreter (sbatch and mpirun pass the environment on)
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "MASTER_PORT": str(free_port()), **extra}


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # being written
            pass
    return out


def _watch(proc: subprocess.Popen, run_dir: Path, t_submit: float, log: Path, on_timeout) -> float:
    """Wait for the launcher to exit; returns seconds from submission to the first logged step."""
    first = None
    deadline = t_submit + TIMEOUT
    while proc.poll() is None:
        if first is None and _records(run_dir):
            first = time.monotonic() - t_submit
        if time.monotonic() > deadline:
            on_timeout()
            raise AssertionError(f"no result within {TIMEOUT}s:\n{log.read_text()[-6000:] if log.exists() else ''}")
        time.sleep(0.2)
    if first is None and _records(run_dir):  # logged between the last look and the exit
        first = time.monotonic() - t_submit
    return first if first is not None else float("nan")


def _check_run(run_dir: Path, out: str, launcher: str) -> list[dict]:
    records = [r for r in _records(run_dir) if not r.get("final")]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), out[-6000:]
    for r in records:
        bad = [k for k in STEP_KEYS if not (isinstance(r.get(k), (int, float)) and math.isfinite(r[k]))]
        assert not bad, f"step {r['step']} lacks finite {bad}: {r}"
    assert records[-1]["weight_version"] >= 1, records[-1]
    m = re.search(r"(\d+) ranks started by (\w+), rendezvous (\S+)", out)
    assert m and m.groups()[:2] == (str(RANKS), launcher), f"launcher line missing or wrong: {m and m.group(0)}"
    for step in range(1, STEPS + 1):
        assert f"step {step}/{STEPS} |" in out
    return records


class _Job:
    """A submitted batch job seen through `scontrol show job` (polled: `sbatch --wait` polls at up to
    tens of seconds, which would hide the launch time)."""

    def __init__(self, job_id: str, env: dict[str, str]):
        self.job_id, self.env, self.returncode, self.show = job_id, env, None, ""

    def poll(self):
        self.show = subprocess.run(["scontrol", "show", "job", self.job_id], capture_output=True, text=True,
                                   env=self.env).stdout
        state = re.search(r"JobState=(\w+)", self.show)
        if state and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            code = re.search(r"\bExitCode=(\d+):(\d+)", self.show)
            self.returncode = int(code.group(1)) if code else -1
        return self.returncode


@pytest.fixture(scope="module")
def sbatch_run(slurm_cluster, demo_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("sbatch")
    run_dir = work / "run"
    env = _env(SLURM_CONF=slurm_cluster)
    cmd = ["sbatch", "--parsable", "--job-name=erc-ci", "--nodes=1", "--gpus-per-node=0",
           f"--ntasks-per-node={RANKS}", f"--output={work}/job-%j.out", f"--chdir={REPO}",
           str(REPO / "launch" / "slurm" / "erc_train.sbatch"), str(CONFIG), *_overrides(demo_model, run_dir)]
    t0 = time.monotonic()
    sub = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    job_id = sub.stdout.strip().split(";")[0]
    assert sub.returncode == 0 and job_id.isdigit(), sub
    job = _Job(job_id, env)
    log = work / f"job-{job_id}.out"
    first = _watch(job, run_dir, t0, log, lambda: subprocess.run(["scancel", job_id], env=env))
    total = time.monotonic() - t0
    jobcomp = (Path(slurm_cluster).parents[1] / "jobcomp.txt").read_text()
    FIGURES.append(f"sbatch job {job_id}: {RANKS} ranks via srun, first step {first:.1f} s after submission, "
                   f"job finished {total:.1f} s after submission")
    return dict(rc=job.returncode, job_id=job_id, out=log.read_text(), show=job.show, jobcomp=jobcomp,
                run_dir=run_dir)


@pytest.fixture(scope="module")
def mpirun_run(demo_model, tmp_path_factory):
    if not shutil.which("mpirun"):
        missing("mpirun (Open MPI)", "bash launch/install_launchers.sh (apt-get install openmpi-bin)")
    probe = subprocess.run([sys.executable, "-c", "import mpi4py"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing("mpi4py", "pip install -e '.[mpi]'")
    work = tmp_path_factory.mktemp("mpirun")
    run_dir, log = work / "run", work / "mpirun.out"
    cmd = ["bash", str(REPO / "launch" / "mpirun.sh"), str(RANKS), str(CONFIG), *_overrides(demo_model, run_dir)]
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=REPO, start_new_session=True)

    def kill():  # mpirun passes SIGTERM on to its ranks
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    first = _watch(proc, run_dir, t0, log, kill)
    total = time.monotonic() - t0
    FIGURES.append(f"mpirun: {RANKS} ranks, first step {first:.1f} s after launch, mpirun exited {total:.1f} s after launch")
    return dict(rc=proc.returncode, out=log.read_text(), run_dir=run_dir)


def test_sbatch_job_trains_and_exits_0(sbatch_run):
    r = sbatch_run
    assert r["rc"] == 0, f"job exit code {r['rc']}:\n{r['show']}\n{r['out'][-6000:]}"
    assert re.search(r"JobState=COMPLETED\b", r["show"]) and re.search(r"\bExitCode=0:0\b", r["show"]), r["show"]
    line = next((ln for ln in r["jobcomp"].splitlines() if ln.startswith(f"JobId={r['job_id']} ")), None)
    assert line and "JobState=COMPLETED" in line and " ExitCode=0:0" in line, r["jobcomp"]
    assert re.search(r"NodeCnt=1 ProcCnt=\d+", line), line
    _check_run(r["run_dir"], r["out"], "slurm")


def test_mpirun_trains_and_exits_0(mpirun_run):
    r = mpirun_run
    assert r["rc"] == 0, r["out"][-6000:]
    _check_run(r["run_dir"], r["out"], "mpi")


def test_both_launchers_train_the_same(sbatch_run, mpirun_run):
    """Same recipe, same seeds, same layout: the launcher must not change what is learned."""
    a = [r for r in _records(sbatch_run["run_dir"]) if not r.get("final")]
    b = [r for r in _records(mpirun_run["run_dir"]) if not r.get("final")]
    assert len(a) == len(b) == STEPS
    for ra, rb in zip(a, b):
        keys = {k for k in (*ra, *rb) if not k.startswith("time/")}
        diff = {k: (ra.get(k), rb.get(k)) for k in sorted(keys)
                if not (ra.get(k) == rb.get(k) or (isinstance(ra.get(k), float) and isinstance(rb.get(k), float)
                                                   and math.isclose(ra[k], rb[k], rel_tol=1e-9, abs_tol=1e-12)))}
        assert not diff, f"step {ra['step']}: sbatch and mpirun runs differ in {diff}"
