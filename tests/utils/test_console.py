"""Console: the expected-warning filters, quiet ranks, the environment line and progress lines.

The real run's console (no third-party warnings, rank 0's lines only) is checked on the end-to-end
launch in tests/train/test_train_e2e.py.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings

import pytest

from erc_megatron.utils import console
from erc_megatron.utils.console import EXPECTED, Progress, environment_line, eta_seconds, format_seconds


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _warn_from(module: str, message: str) -> None:
    warnings.warn_explicit(message, UserWarning, f"{module.replace('.', '/')}.py", 1, module=module)


def test_expected_warnings_are_hidden_and_others_still_show():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        console.silence_expected(cuda=False)
        for e in EXPECTED:
            if e.logger is None:
                # the message as megatron-core words it: the pattern plus the rest of its sentence
                _warn_from("megatron.core.some_module", e.message.replace("\\", "") + " and more")
        _warn_from("megatron.core.some_module", "a new megatron warning nobody expects")
        _warn_from("somebody.else", "Apex is not installed")  # same text from another package: shown
    assert [str(w.message) for w in seen] == ["a new megatron warning nobody expects", "Apex is not installed"]


def test_cpu_only_entries_stay_visible_on_gpus():
    cpu_only = [e for e in EXPECTED if e.cpu_only and e.logger is None]
    assert cpu_only, "the CUDA_DEVICE_MAX_CONNECTIONS hint is only noise on CPU"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        console.silence_expected(cuda=True)
        for e in cpu_only:
            _warn_from("megatron.core.tensor_parallel.layers", e.message.replace("\\", ""))
    assert len(seen) == len(cpu_only)
    assert all(e.why for e in EXPECTED) and "CUDA_DEVICE_MAX_CONNECTIONS" in console.describe_expected(cuda=False)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in console.describe_expected(cuda=True)


def test_expected_log_records_are_dropped_at_their_logger():
    entries = [e for e in EXPECTED if e.logger is not None]
    assert entries
    console.silence_expected(cuda=False)
    got: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    handler = Collect(logging.WARNING)
    try:
        for e in entries:  # torch's loggers do not propagate to the root: collect at each one
            logging.getLogger(e.logger).addHandler(handler)
            logging.getLogger(e.logger).warning(e.message.replace("\\", "") + " (details)")
            logging.getLogger(e.logger).warning("something else went wrong")
    finally:
        for e in entries:
            logging.getLogger(e.logger).removeHandler(handler)
    assert got == ["something else went wrong"] * len(entries)


def test_launch_rank_reads_every_launcher():
    assert console.launch_rank({}) == 0
    assert console.launch_rank({"RANK": "3"}) == 3
    assert console.launch_rank({"SLURM_PROCID": "5"}) == 5
    assert console.launch_rank({"OMPI_COMM_WORLD_RANK": "2"}) == 2
    assert console.launch_rank({"RANK": "1", "SLURM_PROCID": "7"}) == 1  # torchrun inside srun


def test_other_ranks_show_errors_only():
    """A rank > 0 in a fresh process: prints, warnings and log warnings vanish; errors and stderr stay."""
    code = textwrap.dedent("""
        import logging, sys, warnings
        from erc_megatron.utils import console
        console.setup(cuda=False)
        print("progress from rank 1")
        warnings.warn("some warning")
        logging.getLogger("megatron.core").warning("a megatron warning")
        logging.getLogger("erc_megatron.x").error("an error")
        console.say("rank 0 only")
        warnings.warn_explicit("partial batch", RuntimeWarning, console.__file__, 1)  # one of ours
        print("traceback-like", file=sys.stderr)
    """)
    env = {"RANK": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert r.stderr.splitlines() == ["an error", "traceback-like"], r.stderr
    r0 = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**env, "RANK": "0"}, timeout=60)
    assert r0.stdout.splitlines() == ["progress from rank 1", "[erc-megatron] rank 0 only"], r0.stdout
    assert "UserWarning: some warning" in r0.stderr and "a megatron warning" in r0.stderr
    assert "[erc-megatron] warning: partial batch" in r0.stderr.splitlines(), r0.stderr


def test_environment_line_names_layout_versions_and_what_is_missing():
    line = environment_line(backend="gloo", device="CPU", world_size=4, launcher="torchrun", tp=2, pp=2, dp=1,
                            versions={"torch": "2.13.0", "megatron-core": "0.16.1"},
                            absent=[("apex", "torch norms and AdamW")])
    assert line == ("gloo on CPU, 4 ranks (torchrun), layout TP2xPP2xDP1 | torch 2.13.0, megatron-core 0.16.1 "
                    "| absent: apex (torch norms and AdamW)")
    line = environment_line(backend="nccl", device="GPU", world_size=64, launcher="slurm", tp=4, pp=2, dp=4, cp=2,
                            ep=8, versions={}, absent=[])
    assert "layout TP4xPP2xDP4xCP2 EP8" in line and line.endswith("absent: none")
    assert "\n" not in line


def test_absent_parts_asks_the_finder_without_importing():
    asked = []

    def find(name):
        asked.append(name)
        return object() if name == "apex" else None

    absent = console.absent_parts(find)
    assert asked == [m for m, _, _ in console.OPTIONAL_PARTS]
    assert [n for n, _ in absent] == [s for m, s, _ in console.OPTIONAL_PARTS if m != "apex"]
    assert all(what for _, what in absent)


def test_eta_from_rate_then_from_previous_duration():
    assert eta_seconds(30.0, 10, 40, None) == pytest.approx(90.0)  # 3 s per unit, 30 units left
    assert eta_seconds(30.0, 40, 40, None) == 0.0
    assert eta_seconds(30.0, None, 40, 100.0) == pytest.approx(70.0)  # no count yet: last time took 100 s
    assert eta_seconds(130.0, 0, 40, 100.0) == 0.0
    assert eta_seconds(5.0, None, None, None) is None
    assert [format_seconds(s) for s in (4.4, 59.6, 61, 3599, 3600 * 2 + 61)] == ["4s", "60s", "1m01s", "59m59s",
                                                                                 "2h01m"]


def test_progress_prints_every_interval_with_eta_and_a_closing_line():
    clock, lines = FakeClock(), []
    with Progress("rollout step 3/10", total=128, unit="groups", every_s=10, out=lines.append, clock=clock,
                  thread=False) as p:
        clock.t += 5
        assert not p.tick()  # under the interval: nothing
        p.update(32)
        clock.t += 5
        assert p.tick()
        clock.t += 3
        assert not p.tick()
        p.update(96)
        clock.t += 10
        assert p.tick()
    assert lines == ["rollout step 3/10: 32/128 groups (25%), 10s elapsed, ETA 30s",
                     "rollout step 3/10: 96/128 groups (75%), 23s elapsed, ETA 8s",
                     "rollout step 3/10: done in 23s"]
    assert p.elapsed == pytest.approx(23.0)


def test_progress_without_counts_uses_the_previous_duration_and_short_phases_print_nothing():
    clock, lines = FakeClock(), []
    with Progress("validation", expected_s=50, every_s=10, out=lines.append, clock=clock, thread=False) as p:
        clock.t += 12
        p.tick()
    assert lines == ["validation: 12s elapsed, ETA 38s", "validation: done in 12s"]
    lines.clear()
    with Progress("validation", expected_s=50, every_s=10, out=lines.append, clock=clock, thread=False) as p:
        clock.t += 9
        p.tick()
    assert lines == []


def test_progress_thread_reports_during_a_blocking_call():
    """The timer thread prints while the caller is blocked (one batched /generate)."""

    import time

    lines = []
    with Progress("blocking", every_s=0.05, out=lines.append) as p:
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:  # the caller is "blocked" here
            time.sleep(0.01)
        p.update(1, 2)
    assert len(lines) >= 2 and lines[-1].startswith("blocking: done in"), lines
    assert lines[0].startswith("blocking: ") and "elapsed" in lines[0]
