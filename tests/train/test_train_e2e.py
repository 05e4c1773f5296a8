"""`erc-megatron train` end to end at TP=2 x PP=2 (torchrun, 4 gloo ranks + the embedded rollout server).

One small demo model (made once per module) and four launches:
- an uninterrupted run: per-step learner statistics, rollout figures and phase timings in
  metrics.jsonl, the same scalars in TensorBoard, a PNG from `erc-megatron plot`, a progress line
  per step; with step 2's communication profiled (comm_profile.json / .png, comm_trace.json,
  `erc-megatron profile-comm`): counts and bytes of the collectives the shapes imply;
- the same run killed with SIGKILL after step 3 (checkpoint at step 2), with a half-written later
  checkpoint planted, then restarted with the same command: it resumes from step 2 and its steps
  3..N, final validation and final weights equal the uninterrupted run's (the run is
  deterministic on CPU: every rollout sample carries its own sampling seed);
- a run whose rollout server is killed: every rank stops with the server's URL and endpoint in the
  error, nothing hangs, and the last checkpoint loads and equals the uninterrupted run's.
Config errors are checked without processes.

Processes are found and killed through /proc (Linux): torchrun starts each worker in its own
session, so killing torchrun's process group alone would leave the workers running.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from erc_megatron.model.config import ConfigError
from tests.demo_runs import read_metrics

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "cpu_demo.yaml"
STEPS = 4
SAVE_EVERY = 2
ERC_LOW, ERC_HIGH = 0.95, 1.05  # examples/cpu_demo.yaml
# every learner / rollout figure a step must report (timings checked separately)
STEP_KEYS = ("erc/in_band_frac", "erc/low_frac", "erc/high_frac", "erc/rho_mean", "erc/rho_min", "erc/rho_max",
             "entropy/mean", "entropy/old_mean", "pg/clip_frac", "pg/approx_kl", "pg/loss", "grad_norm",
             "rollout/reward_mean", "rollout/accuracy", "rollout/response_length", "weight_version")
TIME_KEYS = ("time/rollout", "time/old_policy", "time/update", "time/weight_sync")
LAUNCH_TIMEOUT = 400
PROFILED_STEP = 2  # no validation before it: only training collectives
PROFILE = ("trainer.profile_comm=true", f"trainer.profile_steps=[{PROFILED_STEP}]")

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")]


# ---------------------------------------------------------------------------------------------- helpers
def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, parents first."""
    children, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children.get(p, [])
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun, its workers and the server rank 0 started (a node dying), all at once."""
    for pid in _tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _launch(demo: Path, run_dir: Path, steps: int = STEPS, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
    overrides = [f"model.path={demo / 'model'}", f"data.train_path={demo / 'train.jsonl'}",
                 f"data.val_path={demo / 'val.jsonl'}", f"trainer.run_dir={run_dir}", f"trainer.steps={steps}",
                 f"trainer.save_every={SAVE_EVERY}", "trainer.prompts_per_step=4", "trainer.prompts_per_minibatch=2",
                 "trainer.micro_batch_size=4", "rollout.n_samples_per_prompt=4", "validation.every_steps=2",
                 "validation.max_prompts=8", "validation.n_samples=2", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "erc_megatron.cli", "train", "--config", str(RECIPE), *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    out_path = run_dir.parent / f"{run_dir.name}.out"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # warnings as a user gets them: the console test checks
    with open(out_path, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, out_path


def _finish(proc: subprocess.Popen, out_path: Path, timeout: float = LAUNCH_TIMEOUT) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise AssertionError(f"run did not finish within {timeout}s:\n{out_path.read_text()[-6000:]}") from None
    return out_path.read_text()


def _wait_for(condition, proc: subprocess.Popen, out_path: Path, what: str, timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run exited (rc {proc.returncode}) before {what}:\n{out_path.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            _kill_tree(proc)
            raise AssertionError(f"no {what} within {timeout}s:\n{out_path.read_text()[-6000:]}")
        time.sleep(0.01)


_records = read_metrics


def _by_step(records: list[dict]) -> dict[tuple[int, bool], dict]:
    """(step, is the final-validation record) -> record; each must occur exactly once."""
    out: dict[tuple[int, bool], dict] = {}
    for r in records:
        key = (r["step"], bool(r.get("final")))
        assert key not in out, f"step {key} logged twice: {out[key]} and {r}"
        out[key] = r
    return out


def _latest(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    return a == b


def _assert_same_record(got: dict, want: dict, where: str) -> None:
    keys = {k for k in (*got, *want) if not k.startswith("time/")}
    diff = {k: (got.get(k), want.get(k)) for k in sorted(keys) if not _same(got.get(k), want.get(k))}
    assert not diff, f"{where}: differs from the uninterrupted run in {diff}"


def _model_states(folder: Path) -> dict[int, dict]:
    return {r: torch.load(folder / f"rank_{r:05d}.pt", map_location="cpu", weights_only=False)["model"]
            for r in range(4)}


def _assert_same_weights(folder_a: Path, folder_b: Path) -> None:
    a, b = _model_states(folder_a), _model_states(folder_b)
    for rank in a:
        tensors = {k: v for k, v in a[rank].items() if isinstance(v, torch.Tensor)}
        assert tensors, f"{folder_a} rank {rank} holds no tensors"
        assert tensors.keys() == {k for k, v in b[rank].items() if isinstance(v, torch.Tensor)}
        for k, v in tensors.items():
            assert torch.equal(v, b[rank][k]), f"rank {rank} {k}: {folder_a} and {folder_b} differ"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo(small_demo) -> Path:
    return small_demo


@pytest.fixture(scope="module")
def baseline(demo, tmp_path_factory) -> tuple[Path, str, float]:
    """The uninterrupted run: (run_dir, its output, seconds)."""
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    t0 = time.monotonic()
    proc, out_path = _launch(demo, run_dir, extra=PROFILE)
    out = _finish(proc, out_path)
    assert proc.returncode == 0, out[-6000:]
    return run_dir, out, time.monotonic() - t0


# ---------------------------------------------------------------------------------------------- tests
def test_run_writes_every_step_metrics_tensorboard_and_plot(baseline, tmp_path):
    run_dir, out, seconds = baseline
    records = _by_step(_records(run_dir))
    assert sorted(records) == [(s, False) for s in range(1, STEPS + 1)] + [(STEPS, True)], sorted(records)
    for step in range(1, STEPS + 1):
        m = records[(step, False)]
        missing = [k for k in (*STEP_KEYS, *TIME_KEYS) if not isinstance(m.get(k), (int, float))]
        assert not missing, f"step {step} lacks {missing}: {m}"
        assert all(m[k] > 0 for k in TIME_KEYS), m
        assert math.isclose(m["erc/in_band_frac"] + m["erc/low_frac"] + m["erc/high_frac"], 1.0, abs_tol=1e-9), m
        assert m["erc/rho_min"] <= m["erc/rho_mean"] <= m["erc/rho_max"], m
        # a token below / above the band exists exactly when some update clipped on that side
        assert (m["erc/low_frac"] > 0) == (m["erc/rho_min"] <= ERC_LOW), m
        assert (m["erc/high_frac"] > 0) == (m["erc/rho_max"] >= ERC_HIGH), m
        for k in ("erc/in_band_frac", "pg/clip_frac", "rollout/accuracy"):
            assert 0.0 <= m[k] <= 1.0, (k, m)
        assert m["entropy/mean"] > 0 and m["entropy/old_mean"] > 0 and m["grad_norm"] > 0, m
        assert m["skipped"] == 0.0 and m["updated"] >= 1.0, m
        # one weight version per step with an update; nothing else bumps it
        assert m["weight_version"] == float(step), m
        # validation every 2 steps (before steps 1 and 3), and at the end
        assert ("val/accuracy" in m) == (step in (1, 3)), m
        line = re.search(rf"^step {step}/{STEPS} \| reward (\S+) acc (\S+) .*erc_in_band (\S+) .*$", out, re.M)
        assert line, f"no progress line for step {step} in:\n{out[-4000:]}"
        assert float(line.group(3)) == pytest.approx(m["erc/in_band_frac"], abs=5e-4)
    # the old policy is the policy on a step's first mini-batch: rho == 1 there, and the band clips
    # something over the run (otherwise the ERC checks above prove little)
    assert records[(1, False)]["erc/rho_min"] <= 1.0 <= records[(1, False)]["erc/rho_max"]
    assert any(records[(s, False)]["erc/in_band_frac"] < 1.0 for s in range(2, STEPS + 1)), records
    assert "val/accuracy" in records[(STEPS, True)]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000002", "step_000004"]
    assert _latest(run_dir) == "step_000004"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in STEP_KEYS:
        scalars = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in scalars] == list(range(1, STEPS + 1)), (key, scalars)
        for step, value in scalars:
            assert value == pytest.approx(records[(step, False)][key], rel=1e-6, abs=1e-7), (key, step)

    png = tmp_path / "plot.png"
    plot = subprocess.run([sys.executable, "-m", "erc_megatron.cli", "plot", str(run_dir), "--out", str(png)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # written by the run itself
    acc = [records[(s, False)]["rollout/accuracy"] for s in range(1, STEPS + 1)]
    print(f"uninterrupted run: {seconds:.1f}s, rollout accuracy {acc}, "
          f"val accuracy {records[(1, False)]['val/accuracy']} -> {records[(STEPS, True)]['val/accuracy']}")


def test_console_shows_rank0_lines_once_and_no_third_party_warnings(baseline):
    """What a user sees on the 4-rank run: rank 0's lines, each once; no warnings from any rank."""
    from importlib.metadata import version

    out = baseline[1]
    lines = out.splitlines()
    # the communication profile of step 2 is one rank-0 message: its header line, then the table
    head = next(i for i, line in enumerate(lines) if line.startswith("[erc-megatron] communication profile (steps"))
    end = next(i for i in range(head, len(lines)) if lines[i].startswith("(summed over "))
    lines = lines[:head + 1] + lines[end + 1:]
    foreign = [line for line in lines if not re.match(r"(\[erc-megatron\] |step \d+/\d+ \| )", line)]
    assert not foreign, "lines other than rank 0's own:\n" + "\n".join(foreign[:40])
    # the project's own warnings (a partial dynamic-sampling batch) are single prefixed lines
    warned = [line for line in lines if re.search(r"warn", line, re.I)]
    assert all(line.startswith("[erc-megatron] warning: ") for line in warned), warned
    env = [line for line in lines if " layout TP2xPP2xDP1 " in line]
    assert len(env) == 1, out[-6000:]
    assert env[0].startswith("[erc-megatron] gloo on CPU, 4 ranks (torchrun), layout TP2xPP2xDP1 |"), env
    for package in ("torch", "megatron-core", "transformers"):
        assert f"{package} {version(package)}" in env[0], (package, env[0])
    assert re.search(r"\| absent: .*Transformer Engine \(", env[0]), env[0]
    for once in (r"\[erc-megatron\] training steps 1\.\.\d+ \(4 ranks started by torchrun, rendezvous ", r"\[erc-megatron\] final validation: "):
        assert len([line for line in lines if re.match(once, line)]) == 1, (once, out[-6000:])
    assert [int(m) for m in re.findall(r"^step (\d+)/", out, re.M)] == list(range(1, STEPS + 1))
    assert re.search(rf"^step {STEPS}/{STEPS} \|.* \| ETA 0s$", out, re.M), out[-2000:]


def test_killed_run_resumes_from_checkpoint_and_matches_uninterrupted_run(baseline, demo, tmp_path):
    ref_dir = baseline[0]
    ref = _by_step(_records(ref_dir))
    run_dir = tmp_path / "killed"
    proc, out_path = _launch(demo, run_dir)
    try:
        # step 3 is done and logged, its checkpoint (step 4) not yet written
        _wait_for(lambda: any(r["step"] == 3 for r in _records(run_dir)), proc, out_path, "step 3 record")
    finally:
        _kill_tree(proc)
    assert _latest(run_dir) == "step_000002", f"killed too late: latest is {_latest(run_dir)}"
    assert any(r["step"] == 3 for r in _records(run_dir))

    # what a kill during a later save leaves: a folder with a truncated shard and a temp file, no
    # trainer.json, `latest` unchanged; and an orphan from a longer earlier attempt
    ckpts = run_dir / "checkpoints"
    good = (ckpts / "step_000002" / "rank_00000.pt").read_bytes()
    for name in ("step_000004", "step_000006"):
        (ckpts / name).mkdir(exist_ok=True)
        (ckpts / name / "rank_00000.pt").write_bytes(good[: len(good) // 2])
        (ckpts / name / ".rank_00001.pt.tmp").write_bytes(good[:100])

    # and a metrics line cut short by the kill
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rollout/reward_mean": 0.')

    t0 = time.monotonic()
    proc, out_path = _launch(demo, run_dir)
    out = _finish(proc, out_path)
    assert proc.returncode == 0, out[-6000:]
    print(f"resumed run: {time.monotonic() - t0:.1f}s")
    assert re.search(r"resumed from \S+step_000002 at step 2", out), out[-4000:]

    got = _by_step(_records(run_dir))
    assert sorted(got) == sorted(ref), sorted(got)
    for key in sorted(ref):  # steps 1-2 from the killed run, 3-4 and the final validation resumed
        _assert_same_record(got[key], ref[key], f"step {key}")
    assert any(got[(s, False)]["erc/in_band_frac"] < 1.0 for s in (3, 4)), "ERC clipped nothing after the resume"
    _assert_same_weights(ckpts / "step_000004", ref_dir / "checkpoints" / "step_000004")
    assert not (ckpts / "step_000006").exists(), "the orphan later checkpoint was not pruned"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000002", "step_000004"]
    assert not list((ckpts / "step_000004").glob(".*tmp")), "temporary files left in a complete checkpoint"

    # TensorBoard shows the resumed values only: the killed run's step 3 is purged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("erc/rho_mean")]
    assert [s for s, _ in scalars] == list(range(1, STEPS + 1)), scalars
    assert [v for _, v in scalars] == pytest.approx([ref[(s, False)]["erc/rho_mean"] for s in range(1, STEPS + 1)],
                                                    rel=1e-6)


def test_rollout_server_death_stops_every_rank_with_the_server_named(baseline, demo, tmp_path):
    from erc_megatron.train.checkpoint import latest_checkpoint

    run_dir = tmp_path / "server_dies"
    proc, out_path = _launch(demo, run_dir, steps=50)
    try:
        _wait_for(lambda: _latest(run_dir) is not None, proc, out_path, "first checkpoint")
        started = _tree(proc.pid)
        servers = [p for p in started if "erc_megatron.cli serve" in _cmdline(p)]
        assert len(servers) == 1, [(p, _cmdline(p)) for p in started]
        os.kill(servers[0], signal.SIGKILL)
        t_kill = time.monotonic()
        out = _finish(proc, out_path, timeout=120)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    stopped_after = time.monotonic() - t_kill
    print(f"server killed: trainer stopped {stopped_after:.1f}s later")
    assert proc.returncode != 0
    url = re.search(r"listening on (http://\S+)", (run_dir / "rollout_server.log").read_text()).group(1)
    where = re.escape(url) + r"/(\w+)"
    summary = re.search(r"^\[erc-megatron\] training failed: SGLangError: rollout server call " + where + " failed",
                        out, re.M)
    assert summary, out[-6000:]
    # every other rank stops with rank 0's reason, not with a gloo "connection closed"
    for rank in (1, 2, 3):
        assert re.search(rf"^\[rank{rank}\]: RuntimeError: rank 0 failed, stopping: SGLangError: rollout server "
                         rf"call {where} failed", out, re.M), (rank, out[-6000:])
    assert not [p for p in started if _alive(p)], "processes left behind"

    folder = latest_checkpoint(run_dir)
    assert folder is not None
    state = json.loads((folder / "trainer.json").read_text())
    assert folder.name == f"step_{state['step']:06d}" and state["step"] % SAVE_EVERY == 0
    if state["step"] <= STEPS:  # the uninterrupted run kept steps 2 and 4: same config up to there
        _assert_same_weights(folder, baseline[0] / "checkpoints" / folder.name)
    else:
        assert _model_states(folder)


def _load(*overrides: str):
    from erc_megatron.train.config import RunConfig
    from erc_megatron.utils import config_tree

    return config_tree.load(RunConfig, RECIPE, ["model.path=/m", "data.train_path=/d/train.jsonl", *overrides])


@pytest.mark.parametrize("override, message", [
    ("trainer.steps=0", r"trainer\.steps must be >= 1, got 0"),
    ("trainer.steps=abc", r"trainer\.steps must be an integer, got 'abc'"),
    ("trainer.stepz=3", r"unknown config key\(s\) 'stepz' in trainer; allowed: .*\bsteps\b"),
    ("lossy.erc=true", r"unknown config key\(s\) 'lossy' in top level; allowed: .*\bloss\b"),
    ("loss.erc=maybe", r"loss\.erc must be true or false, got 'maybe'"),
    ("trainer.prompts_per_step=10", r"trainer\.prompts_per_step \(10\) must be a multiple of "
                                    r"trainer\.prompts_per_minibatch \(8\)"),
    ("rollout.temperature=0", r"rollout\.temperature must be > 0"),
    ("optim.lr_decay_style=exp", r"optim\.lr_decay_style must be one of \('constant', 'linear', 'cosine'\), "
                                 r"got 'exp'"),
    ("parallel.tensor_model_parallel_size=0", r"parallel\.tensor_model_parallel_size must be >= 1, got 0"),
])
def test_config_error_names_field_and_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        _load(override)


@pytest.mark.parametrize("override, message", [
    ("loss.erc_low=1.5", r"loss\.erc_low must be in \(0, 1\).*got 1\.5"),
    ("loss.surrogate=foo", r"loss\.surrogate must be one of \('ppo_clip', 'gppo', 'cispo', 'gspo'\) "
                           r"or a 'package\.module:function' path, got 'foo'"),
    ("model.params_dtype=fp8", r"model\.params_dtype must be one of .*float32.*got 'fp8'"),
    ("trainer.save_every=-1", r"trainer\.save_every must be >= 0, got -1"),
])
def test_config_error_names_the_section_path(override, message):
    with pytest.raises(ConfigError, match=message):
        _load(override)


def test_config_errors_in_loss_section_name_field_and_values_today():
    """What the loss section says now (class-qualified field name, allowed values, the bad value)."""
    with pytest.raises(ConfigError, match=r"\berc_low must be in \(0, 1\).*got 1\.5"):
        _load("loss.erc_low=1.5")
    with pytest.raises(ConfigError, match=r"\bsurrogate must be one of \('ppo_clip', 'gppo', 'cispo', 'gspo'\)"):
        _load("loss.surrogate=foo")
    cfg = _load("loss.erc_low=0.9", "trainer.steps=7")  # and good values pass through
    assert cfg.loss.erc_low == 0.9 and cfg.trainer.steps == 7 and cfg.logits.temperature == cfg.rollout.temperature


def test_latest_pointer_to_incomplete_checkpoint_is_refused(tmp_path):
    from erc_megatron.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path) is None  # no checkpoint yet: a fresh start
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_000002").mkdir(parents=True)
    (ckpts / "step_000002" / "trainer.json").write_text("{}")
    (ckpts / "step_000004").mkdir()
    (ckpts / "latest").write_text("step_000002")
    assert latest_checkpoint(tmp_path) == ckpts / "step_000002"
    (ckpts / "latest").write_text("step_000004")
    with pytest.raises(FileNotFoundError, match=r"latest names step_000004, which has no trainer\.json"):
        latest_checkpoint(tmp_path)


def test_comm_profile_of_tp2pp2_step_counts_and_sizes_what_the_shapes_imply(baseline, demo, tmp_path):
    """Ranks 0,1 = first stage (TP pair), 2,3 = last stage; the profiled step's shapes are in the profile."""
    from transformers import AutoConfig

    from erc_megatron.model.config import ModelConfig
    from erc_megatron.ops.vocab_parallel_stats import compute_dtype
    from erc_megatron.weights.hf_stream import plan_hf_buckets

    run_dir, out, _ = baseline
    profile = json.loads((run_dir / "comm_profile.json").read_text())
    assert profile["steps"] == [PROFILED_STEP] and profile["world_size"] == 4
    assert "communication profile (steps [2]):" in out and re.search(r"^TP\s+all_gather_single\s", out, re.M), out[-4000:]
    hf = AutoConfig.from_pretrained(demo / "model")
    cfg = ModelConfig.from_hf_config(hf, make_vocab_size_divisible_by=8)
    act = 4  # float32 activations / params
    ranks = {r["rank"]: r for r in profile["ranks"]}

    def events(rank, **want):
        return [e for e in ranks[rank]["events"] if all(e[k] == v for k, v in want.items())]

    for rank in range(4):
        step = ranks[rank]["steps"][0]
        phases = step["phases"]
        (old,) = phases["old_policy"]["attrs"]
        updates = phases["forward_backward"]["attrs"]  # one per optimizer step
        n_old = old["micro_batches"]
        n_upd = sum(a["micro_batches"] for a in updates)
        b, s = old["micro_batch_shape"]
        assert all(a["micro_batch_shape"] == [b, s] for a in updates)
        # the rollout reaches every rank as compact tensors: metrics/errors (object), the per-sample
        # table, and each rank's token share (train/rollout_share.py)
        assert [e["op"] for e in events(rank, phase="rollout_broadcast")] == ["broadcast_object_list", "broadcast",
                                                                             "scatter"]
        assert all(e["role"] == "world" for e in events(rank, phase="rollout_broadcast"))
        # statistics: 2 world all-reduces (SUM, MAX) per optimizer step, float64, nothing else in the phase
        stats = events(rank, phase="statistics")
        assert [(e["op"], e["role"], e["group_size"]) for e in stats] == [("all_reduce", "statistics", 4)] * 2 * len(updates)
        assert all(e["bytes"] > 0 and e["bytes"] % 8 == 0 for e in stats)
        # the log-prob op: one TP all-gather of [4, b*s] stats per micro-batch forward, last stage only
        last = rank >= 2
        stat_bytes = 4 * b * s * torch.empty((), dtype=compute_dtype(torch.float32)).element_size()
        for phase, n in (("old_policy", n_old), ("forward_backward", n_upd)):
            gathers = events(rank, phase=phase, op="all_gather_single")
            assert len(gathers) == (n if last else 0), (rank, phase, len(gathers), n)
            assert all((e["role"], e["group_size"], e["bytes_in"], e["bytes_out"]) == ("TP", 2, stat_bytes, 2 * stat_bytes)
                       for e in gathers), gathers[:2]
        # pipeline p2p: [s, b, hidden] float32 activations forward, their gradients backward
        msg = s * b * cfg.hidden_size * act
        for phase, n, backward in (("old_policy", n_old, False), ("forward_backward", n_upd, True)):
            p2p = events(rank, phase=phase, op="batch_isend_irecv")
            assert p2p and all(e["role"] == "PP" and e["group_size"] == 2 for e in p2p), (rank, phase)
            assert all(e["bytes_in"] in (0, msg) and e["bytes_out"] in (0, msg) for e in p2p), (msg, p2p[:3])
            sent, recvd = sum(e["bytes_in"] for e in p2p), sum(e["bytes_out"] for e in p2p)
            first_stage = (n * msg, n * msg if backward else 0)
            assert (sent, recvd) == (first_stage if not last else first_stage[::-1]), (rank, phase, sent, recvd, n, msg)
        # weight sync: each stage's sender (TP rank 0: ranks 0 and 2) broadcasts one flat bucket per
        # planned bucket of its own stage, on its stage's weight-sync group
        plan = plan_hf_buckets(cfg, 2, 512 * 2**20)  # examples/cpu_demo.yaml: weight_sync_bucket_mb 512
        stage = {0: 0, 2: 1}.get(rank)
        buckets = [sum(t.numel for t in bucket) * act for bucket in plan[stage]] if stage is not None else []
        sync = events(rank, phase="weight_sync", op="broadcast")
        assert [(e["role"], e["bytes"]) for e in sync] == [("weight-sync", n) for n in buckets], (rank, sync)
        # every event is timed and tagged
        for e in ranks[rank]["events"]:
            assert e["step"] == PROFILED_STEP and e["dur_s"] >= e["issue_s"] >= 0 and e["role"] != "other", e

    # the trace: Trace Event Format, one pid per rank, complete events in microseconds
    trace = json.loads((run_dir / "comm_trace.json").read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in xs} == {0, 1, 2, 3}
    assert all(isinstance(e["ts"], (int, float)) and e["dur"] >= 0 and e["ts"] >= 0 for e in xs)
    n_events = sum(len(r["events"]) for r in profile["ranks"])
    assert len([e for e in xs if e["cat"] not in ("step", "phase")]) == n_events
    assert (run_dir / "comm_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # re-rendered from the JSON alone
    res = subprocess.run([sys.executable, "-m", "erc_megatron.cli", "profile-comm", str(run_dir), "--out-dir",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    n_stats = sum(len(events(rank, phase="statistics")) for rank in range(4))
    assert re.search(rf"^statistics\s+all_reduce\s+{n_stats}\s", res.stdout, re.M), res.stdout
    assert (tmp_path / "comm_profile.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "comm_trace.json").read_text()) == trace
