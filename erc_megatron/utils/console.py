"""What a run prints: rank 0 alone speaks, expected third-party noise is silenced once, long phases
report progress.

- `EXPECTED` is the one list of third-party messages that are expected (mostly on CPU) and hidden,
  each with the reason it is harmless. Anything not on it still shows, once, on rank 0.
- `setup()` runs once per process, before megatron-core is imported: it installs those filters,
  turns off tqdm bars (carriage returns make non-tty logs unreadable; `Progress` replaces them)
  and, on every rank but 0, drops stdout, warnings and log records below ERROR, so the other ranks
  only show errors and tracebacks.
- `environment_line()` is the one-line summary printed at start-up.
- `Progress` prints plain periodic lines ("12/128 groups, 40 s elapsed, ETA 1m25s") from a timer
  thread, so a blocking call (one batched /generate) still reports.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from collections.abc import Callable

PREFIX = "[erc-megatron] "


@dataclass(frozen=True)
class Expected:
    """A third-party message expected on this kind of machine and hidden at start-up."""

    message: str
    """Regular expression matched at the start of the message."""
    why: str
    """Why it is harmless here (shown by `describe_expected()`, kept next to the filter)."""
    logger: str | None = None
    """None: a Python warning (UserWarning, from `module`); otherwise the logger that emits it."""
    module: str = r"megatron\."
    """Warnings only: regular expression for the module that warns."""
    cpu_only: bool = False
    """Hidden only without CUDA: on GPUs the message is worth reading."""


EXPECTED: tuple[Expected, ...] = (
    Expected(r"Transformer Engine and Apex are not installed",
             "megatron-core without TE/apex (always so on CPU) falls back to torch AdamW and torch "
             "multi-tensor ops; the environment line says TE/apex are absent"),
    Expected(r"Apex is not installed",
             "megatron-core uses torch's LayerNorm/RMSNorm instead of apex's fused norms"),
    Expected(r"When using async grad allreduce it is recommended to set the environment variable "
             r"CUDA_DEVICE_MAX_CONNECTIONS",
             "a CUDA stream setting; there are no CUDA streams on CPU (GPU launchers set it)", cpu_only=True),
    Expected(r"full scope is deprecated",
             "megatron-core's own default cuda_graph_scope ('full') warns in every TransformerConfig; "
             "CUDA graphs are not used"),
    Expected(r"MimoModelConfig is experimental",
             "megatron-core 0.19.x warns when it imports its own multimodal package; MIMO is not used"),
    Expected(r"GPTModel IS DEPRECATED", logger="megatron.core.models.gpt.gpt_model",
             why="megatron-core 0.19.x points at HybridModel; GPTModel still gets fixes and is the model "
                 "0.16-0.18 offer"),
    Expected(r"No CUDA runtime is found", logger="torch.utils.cpp_extension", cpu_only=True,
             why="PyPI's Linux torch for Python 3.12 is the CUDA build; on a machine without a GPU it "
                 "looks for a CUDA toolkit when megatron-core imports cpp_extension; nothing is compiled"),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def expected_for(cuda: bool) -> list[Expected]:
    return [e for e in EXPECTED if cuda is False or not e.cpu_only]


def describe_expected(cuda: bool = False) -> str:
    """The hidden messages and why, one per line (for `ERC_SHOW_EXPECTED=1` and the docs)."""
    return "\n".join(f"- {e.message!r} ({e.logger or 'warning'}): {e.why}" for e in expected_for(cuda))


def launch_rank(environ: dict[str, str] | None = None) -> int:
    """This process's global rank as the launcher set it (torchrun, srun, mpirun), 0 when alone."""
    env = os.environ if environ is None else environ
    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0


def rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return launch_rank()


def is_main() -> bool:
    return rank() == 0


def say(msg: str) -> None:
    """Print one line on rank 0 only."""
    if is_main():
        print(f"{PREFIX}{msg}", flush=True)


_installed: dict = {}


def silence_expected(cuda: bool) -> list[Expected]:
    """Install the filters for `EXPECTED` (idempotent); returns the entries installed."""
    entries = expected_for(cuda)
    for e in entries:
        if e.logger is None:
            warnings.filterwarnings("ignore", message=e.message, category=UserWarning, module=e.module)
        elif (e.logger, e.message) not in _installed:
            flt = _DropMatching(e.message)
            logging.getLogger(e.logger).addFilter(flt)
            _installed[(e.logger, e.message)] = flt
    return entries


def _quiet_other_rank() -> None:
    """Rank > 0: only errors. Tracebacks (stderr) stay; prints, warnings and info go."""
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("torch", "megatron", "transformers", "erc_megatron"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def _no_progress_bars() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] in ("0", "false", "False"):
        return
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _own_dirs() -> tuple[str, ...]:
    dirs = []
    for name in ("erc_megatron", "erc_megatron.patches"):
        spec = importlib.util.find_spec(name)
        dirs += [os.path.join(os.path.realpath(d), "") for d in (spec.submodule_search_locations or [])]
    return tuple(dirs)


def _show_own_warnings_as_lines() -> None:
    """Our own warnings (skipped steps, partial dynamic-sampling batches) as one prefixed line each;
    third-party ones keep Python's format, so they stand out."""
    default, own = warnings.showwarning, _own_dirs()

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.realpath(filename).startswith(own):
            print(f"{PREFIX}warning: {message}", file=sys.stderr if file is None else file, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def setup(cuda: bool | None = None, process_rank: int | None = None) -> int:
    """Once per process, before megatron-core is imported; returns this process's rank."""
    if "rank" in _installed:
        return _installed["rank"]
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    r = launch_rank() if process_rank is None else process_rank
    silence_expected(cuda)
    _no_progress_bars()
    if r != 0:
        _quiet_other_rank()
    else:
        _show_own_warnings_as_lines()
    if r == 0 and os.environ.get("ERC_SHOW_EXPECTED") == "1":
        print(f"{PREFIX}hidden as expected:\n{describe_expected(cuda)}", flush=True)
    _installed["rank"] = r
    return r


# ---------------------------------------------------------------------------------------------- environment
OPTIONAL_PARTS: tuple[tuple[str, str, str], ...] = (
    # (import name, shown as, what its absence means)
    ("transformer_engine", "Transformer Engine", "no context parallelism, local layer spec"),
    ("apex", "apex", "torch norms and AdamW"),
    ("sglang", "SGLang", "embedded CPU rollout server unless rollout.server_urls"),
    ("mpi4py", "mpi4py", "no launch/mpirun.sh"),
)


def absent_parts(find=importlib.util.find_spec) -> list[tuple[str, str]]:
    """(name, what it disables) for each optional part that is not installed (no import happens)."""
    out = []
    for module, shown, disables in OPTIONAL_PARTS:
        try:
            present = find(module) is not None
        except (ImportError, ValueError):
            present = False
        if not present:
            out.append((shown, disables))
    return out


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def environment_line(*, backend: str, device: str, world_size: int, launcher: str, tp: int, pp: int, dp: int,
                     cp: int = 1, ep: int = 1, versions: dict[str, str], absent: list[tuple[str, str]]) -> str:
    """One line: where it runs, the layout, the versions, and what is missing with its consequence."""
    layout = f"TP{tp}xPP{pp}xDP{dp}" + (f"xCP{cp}" if cp > 1 else "") + (f" EP{ep}" if ep > 1 else "")
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    missing = "; ".join(f"{name} ({what})" for name, what in absent) or "none"
    return (f"{backend} on {device}, {world_size} rank{'s' if world_size != 1 else ''} ({launcher}), "
            f"layout {layout} | {vers} | absent: {missing}")


def runtime_versions() -> dict[str, str]:
    return {"python": ".".join(map(str, sys.version_info[:3])), "torch": package_version("torch"),
            "megatron-core": package_version("megatron-core"), "transformers": package_version("transformers")}


# ---------------------------------------------------------------------------------------------- progress
def format_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def eta_seconds(elapsed: float, done: float | None, total: float | None, expected: float | None) -> float | None:
    """Remaining time: from the rate so far when counts are known, else from a previous run of the phase."""
    if done and total and done > 0:
        return elapsed * max(0.0, total - done) / done
    if expected is not None and expected > 0:
        return max(0.0, expected - elapsed)
    return None


class Progress:
    """Periodic plain-text progress lines for one phase.

        with Progress("rollout (step 3)", total=128, unit="groups", expected_s=last) as p:
            ...; p.update(64)

    A line every `every_s` seconds (env `ERC_PROGRESS_EVERY`, default 10) while the phase runs, and a
    closing line if any was printed; a phase shorter than `every_s` prints nothing. Rank 0 only.
    """

    def __init__(self, label: str, total: float | None = None, unit: str = "", expected_s: float | None = None,
                 every_s: float | None = None, out: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, thread: bool = True):
        self.label, self.total, self.unit, self.expected_s = label, total, unit, expected_s
        self.every_s = float(os.environ.get("ERC_PROGRESS_EVERY", "10")) if every_s is None else every_s
        self.out = out if out is not None else say
        self.clock = clock
        self.done: float | None = None
        self.lines = 0
        self._thread = thread and is_main() and self.every_s > 0
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.start = self.last = clock()
        self.elapsed = 0.0

    def update(self, done: float, total: float | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total

    def line(self) -> str:
        elapsed = self.clock() - self.start
        parts = [self.label + ":"]
        if self.done is not None and self.total:
            count = f"{self.done:g}/{self.total:g} {self.unit}".rstrip()
            parts.append(f"{count} ({100 * self.done / self.total:.0f}%),")
        parts.append(f"{format_seconds(elapsed)} elapsed")
        eta = eta_seconds(elapsed, self.done, self.total, self.expected_s)
        if eta is not None:
            parts[-1] += ","
            parts.append(f"ETA {format_seconds(eta)}")
        return " ".join(parts)

    def tick(self) -> bool:
        """Print a line if `every_s` passed since the last one; True if it printed."""
        now = self.clock()
        if self.every_s > 0 and now - self.last >= self.every_s:
            self.last = now
            self.lines += 1
            self.out(self.line())
            return True
        return False

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.every_s / 4)):
            self.tick()

    def __enter__(self) -> Progress:
        self.start = self.last = self.clock()
        if self._thread:
            self._worker = threading.Thread(target=self._run, name="erc-progress", daemon=True)
            self._worker.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._worker is not None:
            self._worker.join()
        self.elapsed = self.clock() - self.start
        if self.lines and exc_type is None:
            self.out(f"{self.label}: done in {format_seconds(self.elapsed)}")
        return False
