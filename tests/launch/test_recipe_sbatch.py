"""Every per-recipe Slurm script in launch/slurm/ (thin wrappers around erc_train.sbatch), on paper:
ERC_DRY_RUN=1 with a faked node list of the size its `#SBATCH --nodes` asks for prints the learner's
srun over the learner nodes with the script's recipe, and the recipe's layout fits that many GPUs
(`erc-megatron plan`'s model). Every recipe naming an sbatch script in its comments names one
that exists and runs that recipe.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.common import REPO

WRAPPERS = sorted(p for p in (REPO / "launch" / "slurm").glob("*.sbatch") if p.name != "erc_train.sbatch")


def test_every_recipe_naming_an_sbatch_script_names_one_that_runs_it():
    named = 0
    for recipe in sorted((REPO / "examples").glob("*.yaml")):
        for script in re.findall(r"launch/slurm/[\w.-]+\.sbatch", recipe.read_text()):
            named += 1
            assert (REPO / script).exists(), f"{recipe.name} names {script}, which does not exist"
            if script != "launch/slurm/erc_train.sbatch":
                assert f"examples/{recipe.name}" in (REPO / script).read_text(), (recipe.name, script)
    assert named >= len(WRAPPERS)


@pytest.mark.parametrize("script", WRAPPERS, ids=[p.name for p in WRAPPERS])
def test_wrapper_plan_runs_its_recipe_at_a_layout_that_fits(stub_bin, script):
    from erc_megatron.plan.inputs import load_recipe_inputs
    from erc_megatron.plan.search import Hardware, evaluate, layout_problems

    text = script.read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1))
    recipe = re.search(r"examples/([\w.-]+\.yaml)", text).group(0)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "MASTER_", "ROLLOUT_",
                                                                       "SGLANG_", "ERC_", "LEARNER_"))}
    base["PATH"] = f"{stub_bin}:{Path(sys.executable).parent}:/usr/bin:/bin"
    env = {**base, "ERC_DRY_RUN": "1", "SLURM_JOB_NODELIST": f"gpu[{1:02d}-{nodes:02d}]", "SLURM_GPUS_ON_NODE": "8"}
    res = subprocess.run(["bash", str(script), "trainer.steps=3"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    (learner,) = [shlex.split(line) for line in res.stdout.splitlines() if line.startswith("srun --nodes=")
                  and "erc_megatron.cli" in line and "train" in line]
    ranks = int(next(w for w in learner if w.startswith("--ntasks=")).split("=")[1])
    assert learner[learner.index("--config") + 1] == recipe and learner[-1] == "trainer.steps=3"
    rollout_nodes = int(re.search(r"ROLLOUT_NODES:-(\d+)", text).group(1))
    assert ranks == 8 * (nodes - rollout_nodes)
    rec = load_recipe_inputs(str(REPO / recipe), gpus=ranks)
    assert not layout_problems(rec.arch, rec.layout, rec.work)
    cand = evaluate(rec.arch, rec.layout, rec.work, Hardware(gpus=ranks))
    assert cand.fits, (script.name, cand.layout.label, cand.memory.to_dict())
