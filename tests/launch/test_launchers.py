"""The real launchers, running the same 3-step CPU ERC-DAPO training (3 launches in all):
- `sbatch --nodes=2 launch/slurm/erc_train.sbatch` on the local Slurm cluster
  (launch/slurm/local_cluster.sh: two slurmd nodes on this machine), twice:
  * ROLLOUT_NODES=0: srun starts 4 learner ranks (TP=2 x PP=2), 2 on each node, which read SLURM_*
    themselves and meet on the first node, where rank 0 starts the embedded rollout server;
  * ROLLOUT_NODES=1: an `erc-megatron serve` step on the first node, 2 learner ranks (TP=2) on the
    second, which is the rendezvous; the learner reaches the server by the node's name;
- `launch/mpirun.sh 4` (Open MPI as root, oversubscribed): rank 0 picks the rendezvous and mpi4py
  broadcasts it.
Each must finish with exit code 0 (for Slurm: `scontrol show job` and the job-completion log; there
is no slurmdbd, so no `sacct`), log all 3 steps, and say which launcher started how many ranks and
where they met. The runs are deterministic and must log the same learning figures. Seconds from
submission to the first step are printed in the terminal summary.
"""
from __future__ import annotations

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

from erc_megatron.dist.nodelist import expand_slurm_nodelist
from tests.distributed import free_port
from tests.demo_runs import read_metrics
from tests.launch.common import FIGURES, REPO, missing

pytestmark = pytest.mark.e2e  # multi-process launches

CONFIG = REPO / "examples" / "cpu_demo.yaml"
STEPS = 3
RANKS = 4  # TP=2 x PP=2 from the recipe: 4 ranks on a 2-core machine
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


_records = read_metrics


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


def _check_run(run_dir: Path, out: str, launcher: str, ranks: int, rendezvous: str) -> list[dict]:
    records = [r for r in _records(run_dir) if not r.get("final")]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), out[-6000:]
    for r in records:
        bad = [k for k in STEP_KEYS if not (isinstance(r.get(k), (int, float)) and math.isfinite(r[k]))]
        assert not bad, f"step {r['step']} lacks finite {bad}: {r}"
    assert records[-1]["weight_version"] >= 1, records[-1]
    m = re.search(r"(\d+) ranks started by (\w+), rendezvous ([^\s:]+):\d+", out)
    assert m and m.groups() == (str(ranks), launcher, rendezvous), f"launcher line missing or wrong: {m and m.group(0)}"
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


def _sbatch(cluster, demo: Path, work: Path, what: str, nodes: int, tasks_per_node: int, env_extra: dict,
            overrides: list[str]) -> dict:
    run_dir = work / "run"
    env = _env(SLURM_CONF=cluster, **env_extra)
    cmd = ["sbatch", "--parsable", "--job-name=erc-ci", f"--nodes={nodes}", "--gpus-per-node=0",
           f"--ntasks-per-node={tasks_per_node}", f"--output={work}/job-%j.out", f"--chdir={work}",
           str(REPO / "launch" / "slurm" / "erc_train.sbatch"), str(CONFIG), *_overrides(demo, run_dir), *overrides]
    t0 = time.monotonic()
    sub = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    job_id = sub.stdout.strip().split(";")[0]
    assert sub.returncode == 0 and job_id.isdigit(), sub
    job = _Job(job_id, env)
    log = work / f"job-{job_id}.out"
    first = _watch(job, run_dir, t0, log, lambda: subprocess.run(["scancel", job_id], env=env))
    total = time.monotonic() - t0
    jobcomp = (Path(cluster).parents[1] / "jobcomp.txt").read_text()
    node_list = re.search(r"\bNodeList=(\S+)", job.show)
    FIGURES.append(f"sbatch job {job_id} ({what}): first step {first:.1f} s after submission, "
                   f"job finished {total:.1f} s after submission")
    return dict(rc=job.returncode, job_id=job_id, out=log.read_text() if log.exists() else "", show=job.show,
                jobcomp=jobcomp, run_dir=run_dir, work=work,
                nodes=expand_slurm_nodelist(node_list.group(1)) if node_list else [])


@pytest.fixture(scope="module")
def sbatch_run(slurm_cluster, demo_model, tmp_path_factory):
    """ROLLOUT_NODES=0: the learner on both nodes, the embedded rollout server beside rank 0."""
    return _sbatch(slurm_cluster, demo_model, tmp_path_factory.mktemp("sbatch"), "2 nodes x 2 learner ranks",
                   nodes=2, tasks_per_node=RANKS // 2, env_extra={"ROLLOUT_NODES": "0"}, overrides=[])


@pytest.fixture(scope="module")
def sbatch_rollout_node_run(slurm_cluster, demo_model, tmp_path_factory):
    """ROLLOUT_NODES=1: a rollout server step on the first node, 2 learner ranks (TP=2) on the second."""
    return _sbatch(slurm_cluster, demo_model, tmp_path_factory.mktemp("sbatch_rollout"),
                   "rollout node + 2 learner ranks", nodes=2, tasks_per_node=2,
                   env_extra={"ROLLOUT_NODES": "1", "SGLANG_PORT": str(free_port())},
                   overrides=["parallel.pipeline_model_parallel_size=1"])


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


def _assert_job_ok(r: dict) -> None:
    assert r["rc"] == 0, f"job exit code {r['rc']}:\n{r['show']}\n{r['out'][-6000:]}"
    assert re.search(r"JobState=COMPLETED\b", r["show"]) and re.search(r"\bExitCode=0:0\b", r["show"]), r["show"]
    line = next((ln for ln in r["jobcomp"].splitlines() if ln.startswith(f"JobId={r['job_id']} ")), None)
    assert line and "JobState=COMPLETED" in line and " ExitCode=0:0" in line, r["jobcomp"]
    assert " NodeCnt=2 " in line and len(r["nodes"]) == 2, line


def test_sbatch_job_learner_on_two_nodes_with_embedded_server(sbatch_run):
    r = sbatch_run
    _assert_job_ok(r)
    _check_run(r["run_dir"], r["out"], "slurm", RANKS, rendezvous=r["nodes"][0])
    assert re.search(r"rollout servers \['http://127\.0\.0\.1:\d+'\]", r["out"])  # embedded, beside rank 0


def test_sbatch_job_with_a_rollout_node(sbatch_rollout_node_run):
    r = sbatch_rollout_node_run
    _assert_job_ok(r)
    rollout_node, learner_node = r["nodes"]
    _check_run(r["run_dir"], r["out"], "slurm", 2, rendezvous=learner_node)
    urls = re.search(r"rollout servers \['(http://[^']+)'\]", r["out"])
    assert urls and urls.group(1).startswith(f"http://{rollout_node}:"), r["out"][-3000:]
    server_log = r["work"] / f"rollout-{rollout_node}-{urls.group(1).rsplit(':', 1)[1]}.log"
    assert server_log.exists(), sorted(p.name for p in r["work"].iterdir())
    # the server on the rollout node got every step's weights from the learner on the other node
    text = server_log.read_text()
    assert f"Weight version updated to {STEPS}." in text and f"weight_version={STEPS - 1}" in text, text[-3000:]


def test_mpirun_trains_and_exits_0(mpirun_run):
    r = mpirun_run
    assert r["rc"] == 0, r["out"][-6000:]
    _check_run(r["run_dir"], r["out"], "mpi", RANKS, rendezvous="127.0.0.1")


def _assert_same_learning(a_run: dict, b_run: dict, names: str) -> None:
    a = [r for r in _records(a_run["run_dir"]) if not r.get("final")]
    b = [r for r in _records(b_run["run_dir"]) if not r.get("final")]
    assert len(a) == len(b) == STEPS
    for ra, rb in zip(a, b):
        keys = {k for k in (*ra, *rb) if not k.startswith("time/")}
        diff = {k: (ra.get(k), rb.get(k)) for k in sorted(keys)
                if not (ra.get(k) == rb.get(k) or (isinstance(ra.get(k), float) and isinstance(rb.get(k), float)
                                                   and math.isclose(ra[k], rb[k], rel_tol=1e-6, abs_tol=1e-9)))}
        assert not diff, f"step {ra['step']}: {names} differ in {diff}"


def test_every_launcher_trains_the_same(sbatch_run, sbatch_rollout_node_run, mpirun_run):
    """Same recipe, same seeds (every rollout sample carries its own): neither the launcher nor where
    the rollout server runs may change what is learned (TP=2 x PP=2 and TP=2 agree to rounding)."""
    _assert_same_learning(sbatch_run, mpirun_run, "sbatch and mpirun runs")
    _assert_same_learning(sbatch_run, sbatch_rollout_node_run, "embedded-server and rollout-node sbatch runs")


def test_sbatch_job_stops_at_once_when_a_rollout_server_dies(slurm_cluster, demo_model, tmp_path):
    """The rollout node's server cannot bind its port (held here): the job must fail within seconds,
    showing the server's error, instead of the learner waiting out its start-up timeout."""
    import socket

    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        t0 = time.monotonic()
        r = _sbatch(slurm_cluster, demo_model, tmp_path, "rollout server dies", nodes=2, tasks_per_node=2,
                    env_extra={"ROLLOUT_NODES": "1", "SGLANG_PORT": str(port)},
                    overrides=["parallel.pipeline_model_parallel_size=1", "rollout.startup_timeout_s=600"])
        seconds = time.monotonic() - t0
    FIGURES.pop()  # not a launch figure
    assert r["rc"] == 1 and re.search(r"JobState=FAILED\b", r["show"]), r["show"]
    assert "rollout server step ended before the learner" in r["out"], r["out"][-3000:]
    assert "Address already in use" in r["out"], r["out"][-3000:]
    assert not _records(r["run_dir"])
    assert seconds < 200, f"took {seconds:.0f}s"  # not the learner's 600 s wait for a healthy server
