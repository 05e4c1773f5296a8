"""`erc-megatron train` on a tiny Qwen3-MoE at expert parallelism 2 (torchrun, 2 gloo ranks + the
embedded rollout server, which runs transformers' Qwen3MoeForCausalLM and takes the experts'
weight sync under their per-expert names).

The MoE demo model (4 experts per layer, top-2) is made here with a short supervised warm-up on
addition of 0..5 with 70% of the targets off by +1: on the training prompts it answers +1 greedily
and right in about a quarter of its samples, the regime the dense demo is built for. It is trained
with ERC-DAPO from examples/cpu_demo_moe.yaml (its lr, 2e-4) for 30 steps of 8 prompts x 8 samples:
- every step must report the learner and rollout figures of a dense run plus the router load
  balance (moe/aux_loss = E * sum_e f_e P_e in (0, E], since the f_e sum to 1 and each P_e <= 1;
  moe/load_max_over_mean in [1, E/top-k]), the progress line must show them, and the checkpoint
  written at the end must be a Hugging Face Qwen3-MoE checkpoint with per-expert tensors that
  transformers loads;
- the training converges: the mean rollout reward (+1 right, -1 wrong) of the last WINDOW = 5 steps
  exceeds that of the first 5 by more than MIN_RISE;
- control: the same run with lr 1e-12 (the config requires lr > 0; measured, no weight moved by more
  than 6e-11 in its 30 steps, so the policy stays the warm model) shows no such rise.

Measured on the 2-core CPU machine (a run is deterministic; six seeds: this test's, and seeds 1-5 for
the warm-up, data order and sampling): rise 0.48-0.73 (mean 0.60) with training, -0.09-0.08 (mean
0.00, its steps scatter by ~0.1 around a constant mean) in the control. MIN_RISE = 0.3 sits halfway
between the two means: 3.5 standard deviations (0.085) below the trained rises' mean and 4.6 (0.064)
above the control's.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.demo_runs import read_metrics

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "cpu_demo_moe.yaml"
STEPS = 30
WINDOW = 5
MIN_RISE = 0.3
CONTROL_LR = 1e-12
EXPERTS, TOPK = 4, 2
KEYS = ("erc/in_band_frac", "erc/rho_mean", "entropy/mean", "pg/loss", "grad_norm", "rollout/reward_mean",
        "rollout/accuracy", "moe/aux_loss", "moe/load_max_over_mean", "time/weight_sync")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def moe_demo(tmp_path_factory) -> Path:
    from erc_megatron.data.demo_model import DemoModelConfig, WarmupConfig, make_demo
    from erc_megatron.data.synthetic import AdditionTaskConfig

    out = tmp_path_factory.mktemp("moe_demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_demo(str(out), DemoModelConfig(architecture="qwen3_moe"), AdditionTaskConfig(max_operand=5, num_train=200),
                  WarmupConfig(steps=80, eval_samples=2), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return out


def _train(demo: Path, run_dir: Path, *overrides: str) -> tuple[list[dict], str]:
    """Run `erc-megatron train` at EP=2; (the step records of metrics.jsonl, the console text)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "erc_megatron.cli", "train", "--config", str(RECIPE), f"model.path={demo / 'model'}",
           f"data.train_path={demo / 'train.jsonl'}", f"data.val_path={demo / 'val.jsonl'}",
           f"trainer.run_dir={run_dir}", f"trainer.steps={STEPS}", f"trainer.save_every={STEPS}",
           "trainer.prompts_per_step=8", "trainer.prompts_per_minibatch=4", "trainer.micro_batch_size=16",
           "rollout.n_samples_per_prompt=8", "validation.every_steps=0", "validation.max_prompts=4",
           "validation.n_samples=1", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    records = [r for r in read_metrics(run_dir) if not r.get("final")]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), records
    return records, text


def _rewards(records: list[dict]) -> list[float]:
    return [r["rollout/reward_mean"] for r in records]


def _rise(rewards: list[float]) -> float:
    """Mean reward of the last WINDOW steps minus that of the first WINDOW."""
    return sum(rewards[-WINDOW:]) / WINDOW - sum(rewards[:WINDOW]) / WINDOW


@pytest.fixture(scope="module")
def trained(moe_demo, tmp_path_factory) -> tuple[list[dict], str, Path]:
    run_dir = tmp_path_factory.mktemp("moe_run") / "run"
    records, text = _train(moe_demo, run_dir)
    return records, text, run_dir


def test_erc_training_of_a_moe_at_expert_parallel_2(trained):
    transformers = pytest.importorskip("transformers")
    records, text, run_dir = trained
    for r in records:
        assert all(k in r for k in KEYS), sorted(set(KEYS) - set(r))
        assert 0.0 < r["moe/aux_loss"] <= EXPERTS, r
        assert 1.0 <= r["moe/load_max_over_mean"] <= EXPERTS / TOPK + 1e-9, r
        assert r["grad_norm"] > 0 and r["entropy/mean"] > 0, r
    lines = [line for line in text.splitlines() if line.startswith(f"step {STEPS}/{STEPS}")]
    assert lines and "moe aux" in lines[0] and "load max/mean" in lines[0], text[-3000:]
    print(f"MoE EP2 run (step, aux, load max/mean): "
          f"{[(r['step'], round(r['moe/aux_loss'], 3), round(r['moe/load_max_over_mean'], 2)) for r in records[::5]]}")

    exported = run_dir / "checkpoints" / f"step_{STEPS}" / "model"
    if not exported.is_dir():  # the checkpoint folder name is the trainer's; find the HF copy
        found = sorted(run_dir.glob("checkpoints/*/model/config.json"))
        assert found, sorted(str(p) for p in run_dir.rglob("*"))[:40]
        exported = found[-1].parent
    from erc_megatron.weights.checkpoint_io import HFCheckpointReader

    with HFCheckpointReader(str(exported)) as reader:
        names = reader.names()
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names and "model.layers.1.mlp.gate.weight" in names
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported))
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.num_experts == EXPERTS


def test_erc_training_of_the_moe_raises_the_rollout_reward(trained):
    rewards = _rewards(trained[0])
    print(f"MoE EP2 rollout reward: {[round(x, 3) for x in rewards]}, rise {_rise(rewards):.3f}")
    assert _rise(rewards) > MIN_RISE, rewards


def test_control_without_learning_shows_no_rise(moe_demo, trained, tmp_path):
    """The same run with a learning rate too small to change the policy: the reward stays flat, so the
    rise above comes from the updates (and its assertion can fail)."""
    records, _ = _train(moe_demo, tmp_path / "run", f"optim.lr={CONTROL_LR}")
    rewards = _rewards(records)
    print(f"control (lr {CONTROL_LR}) rollout reward: {[round(x, 3) for x in rewards]}, rise {_rise(rewards):.3f}")
    # same model, prompts and sampling seeds: step 1 is the trained run's step 1 exactly
    assert rewards[0] == _rewards(trained[0])[0], (rewards[0], _rewards(trained[0])[0])
    assert _rise(rewards) < MIN_RISE, rewards
