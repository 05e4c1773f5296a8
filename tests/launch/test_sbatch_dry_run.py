"""The sbatch script's multi-node plan, on paper: ERC_DRY_RUN=1 with a faked SLURM_JOB_NODELIST prints
the exact srun commands (rollout servers per rollout node, the learner over the learner nodes), the
learner's environment (MASTER_ADDR = first learner node, NCCL settings) and the rank layout per node.

No Slurm needed: `srun`, `sbatch` and `scontrol` on PATH are replaced by stubs that fail the run, so a
dry run that tried to start anything, or to expand the node list with scontrol, fails here.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from erc_megatron.dist.nodelist import expand_slurm_nodelist
from tests.launch.common import REPO

SCRIPT = REPO / "launch" / "slurm" / "erc_train.sbatch"
CONFIG = REPO / "examples" / "cpu_demo.yaml"


def _dry_run(stub_bin: Path, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "MASTER_", "ROLLOUT_",
                                                                       "SGLANG_", "ERC_", "LEARNER_"))}
    base["PATH"] = f"{stub_bin}:{Path(sys.executable).parent}:/usr/bin:/bin"
    return subprocess.run(["bash", str(SCRIPT), str(CONFIG), *overrides], capture_output=True, text=True, cwd=REPO,
                          env={**base, "ERC_DRY_RUN": "1", **env}, timeout=60)


def _srun_lines(out: str) -> list[list[str]]:
    cmds = []
    for line in out.splitlines():
        if line.startswith("srun "):
            words = shlex.split(line)
            cmds.append(words[:words.index(">")] if ">" in words else words)
    return cmds


def test_gpu_cluster_plan(stub_bin, tmp_path):
    nodelist = "node[01-03],gpu7"
    res = _dry_run(stub_bin, {"SLURM_JOB_NODELIST": nodelist, "SLURM_GPUS_ON_NODE": "8", "SGLANG_TP": "2",
                              "ROLLOUT_NODES": "1", "NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5"},
                   "trainer.steps=3")
    assert res.returncode == 0, res.stderr
    nodes = expand_slurm_nodelist(nodelist)
    rollout, learner = nodes[:1], nodes[1:]
    cmds = _srun_lines(res.stdout)
    (servers, trainer) = cmds
    # one step on the rollout node holding its 8 GPUs, in the background, running 4 SGLang servers
    assert servers[:9] == ["srun", "--nodes=1", "--ntasks=1", "-w", rollout[0], "--gpus-per-task=8", "bash", "-c",
                           servers[8]]
    assert sum(line.endswith("&") for line in res.stdout.splitlines()) == 1
    # run the step's script with a `python` that records what each server was given
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES|$*" >> started.txt\n')
    (fake / "python").chmod(0o755)
    subprocess.run(["bash", "-c", servers[8]], cwd=tmp_path, env={"PATH": f"{fake}:/usr/bin:/bin"}, check=True,
                   timeout=30)
    started = sorted((tmp_path / "started.txt").read_text().splitlines(), key=lambda ln: int(ln.split("--port ")[1].split()[0]))
    assert len(started) == 4
    for i, line in enumerate(started):
        devices, args = line.split("|")
        assert devices == f"{2 * i},{2 * i + 1}"
        assert args == (f"-m sglang.launch_server --model-path runs/demo_model/model --host 0.0.0.0 --port {30000 + 2 * i} "
                        "--tp-size 2 --mem-fraction-static 0.7")  # model.path of the config
        assert (tmp_path / f"sglang-{rollout[0]}-{30000 + 2 * i}.log").exists()
    # the learner: every learner node, 8 ranks each, the servers' URLs, the user's overrides last;
    # --ntasks given: srun would otherwise inherit the job's SLURM_NTASKS, which counts the rollout node
    assert trainer[:6] == ["srun", "--nodes=3", "--ntasks=24", "-w", ",".join(learner), "--ntasks-per-node=8"]
    assert trainer[6:12] == ["python", "-m", "erc_megatron.cli", "train", "--config", str(CONFIG)]
    urls = json.loads(trainer[12].split("=", 1)[1])
    assert trainer[12].startswith("rollout.server_urls=") and trainer[13:] == ["trainer.steps=3"]
    assert urls == [f"http://{rollout[0]}:{30000 + g}" for g in (0, 2, 4, 6)]
    env = dict(line.split(" ", 1)[1].split("=", 1) for line in res.stdout.splitlines() if line.startswith("export "))
    assert env == {"MASTER_ADDR": learner[0], "MASTER_PORT": "29500", "OMP_NUM_THREADS": "8",
                   "NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5"}
    for i, node in enumerate(learner):
        assert f"# node {node}: learner ranks {8 * i}-{8 * i + 7}" in res.stdout


def test_cpu_cluster_plan_with_rollout_node_and_with_embedded_server(stub_bin):
    res = _dry_run(stub_bin, {"SLURM_JOB_NODELIST": "cpu[1-2]", "SLURM_NTASKS_PER_NODE": "4", "ROLLOUT_NODES": "1",
                              "MASTER_PORT": "12345"}, "model.path=/models/a", "model.path=/models/b")
    assert res.returncode == 0, res.stderr
    server, trainer = _srun_lines(res.stdout)
    assert server == ["srun", "--nodes=1", "--ntasks=1", "-w", "cpu1", "python", "-m", "erc_megatron.cli", "serve",
                      "--model-path", "/models/b", "--host", "0.0.0.0", "--port", "30000",  # the last override
                      "--num-threads", "1"]
    assert trainer[:6] == ["srun", "--nodes=1", "--ntasks=4", "-w", "cpu2", "--ntasks-per-node=4"]
    assert trainer[12:] == ['rollout.server_urls=["http://cpu1:30000"]', "model.path=/models/a", "model.path=/models/b"]
    assert "export MASTER_ADDR=cpu2" in res.stdout and "export MASTER_PORT=12345" in res.stdout

    # ROLLOUT_NODES defaults to 0 on CPU: the learner spans every node and rank 0 starts the embedded server
    res = _dry_run(stub_bin, {"SLURM_JOB_NODELIST": "cpu[1-2]", "SLURM_NTASKS_PER_NODE": "2"})
    assert res.returncode == 0, res.stderr
    (trainer,) = _srun_lines(res.stdout)
    assert trainer[:6] == ["srun", "--nodes=2", "--ntasks=4", "-w", "cpu1,cpu2", "--ntasks-per-node=2"]
    assert trainer[12] == "rollout.server_urls=[]"
    assert "export MASTER_ADDR=cpu1" in res.stdout and "device=cpu" in res.stdout


@pytest.mark.parametrize("env, needle", [
    ({"SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "8"}, "need more than ROLLOUT_NODES=1 nodes, the job has 1"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "ERC_DEVICE": "tpu"}, "ERC_DEVICE must be auto, gpu or cpu, got 'tpu'"),
    ({"SLURM_JOB_NODELIST": "n[1-"}, "host list 'n[1-'"),
    ({}, "not inside a Slurm job"),
])
def test_bad_set_ups_are_refused(stub_bin, env, needle):
    res = _dry_run(stub_bin, env)
    assert res.returncode != 0 and needle in res.stderr, res
    assert "dry run called" not in res.stderr
