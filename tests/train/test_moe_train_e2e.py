"""`erc-megatron train` on a tiny Qwen3-MoE at expert parallelism 2 (torchrun, 2 gloo ranks + the
embedded rollout server, which runs transformers' Qwen3MoeForCausalLM and takes the experts'
weight sync under their per-expert names).

The MoE demo model (4 experts per layer, top-2, made here with a short supervised warm-up) is
trained with ERC-DAPO from examples/cpu_demo_moe.yaml. Every step must report the learner and
rollout figures of a dense run plus the router load balance (moe/aux_loss = E * sum_e f_e P_e in
(0, E], since the f_e sum to 1 and each P_e <= 1; moe/load_max_over_mean in [1, E/top-k]), the progress
line must show them, and the checkpoint written at the end must be a Hugging Face Qwen3-MoE
checkpoint with per-expert tensors that transformers loads.
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
STEPS = 3
EXPERTS, TOPK = 4, 2
KEYS = ("erc/in_band_frac", "erc/rho_mean", "entropy/mean", "pg/loss", "grad_norm", "rollout/reward_mean",
        "rollout/accuracy", "moe/aux_loss", "moe/load_max_over_mean", "time/weight_sync")

pytestmark = pytest.mark.e2e


def _make_moe_demo(out: Path) -> Path:
    from erc_megatron.data.demo_model import DemoModelConfig, WarmupConfig, make_demo
    from erc_megatron.data.synthetic import AdditionTaskConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_demo(str(out), DemoModelConfig(architecture="qwen3_moe"), AdditionTaskConfig(num_train=200),
                  WarmupConfig(steps=40, eval_samples=2), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return out


def test_erc_training_of_a_moe_at_expert_parallel_2(tmp_path):
    transformers = pytest.importorskip("transformers")
    demo = _make_moe_demo(tmp_path / "demo")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "erc_megatron.cli", "train", "--config", str(RECIPE), f"model.path={demo / 'model'}",
           f"data.train_path={demo / 'train.jsonl'}", f"data.val_path={demo / 'val.jsonl'}",
           f"trainer.run_dir={run_dir}", f"trainer.steps={STEPS}", f"trainer.save_every={STEPS}",
           "trainer.prompts_per_step=4", "trainer.prompts_per_minibatch=2", "trainer.micro_batch_size=4",
           "rollout.n_samples_per_prompt=4", "validation.every_steps=0", "validation.max_prompts=4",
           "validation.n_samples=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]

    records = [r for r in read_metrics(run_dir) if not r.get("final")]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), records
    for r in records:
        assert all(k in r for k in KEYS), sorted(set(KEYS) - set(r))
        assert 0.0 < r["moe/aux_loss"] <= EXPERTS, r
        assert 1.0 <= r["moe/load_max_over_mean"] <= EXPERTS / TOPK + 1e-9, r
        assert r["grad_norm"] > 0 and r["entropy/mean"] > 0, r
    lines = [line for line in text.splitlines() if line.startswith(f"step {STEPS}/{STEPS}")]
    assert lines and "moe aux" in lines[0] and "load max/mean" in lines[0], text[-3000:]
    print(f"MoE EP2 run: {[(r['step'], round(r['moe/aux_loss'], 3), round(r['moe/load_max_over_mean'], 2), r['rollout/accuracy']) for r in records]}")

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
