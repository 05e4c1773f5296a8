"""Interop with SGLang 0.5.23's own code: its request classes, its front-end client and its
response builders against the embedded server (tests/rollout/sglang_interop.py, in one child
process). Needs `bash tests/rollout/install_sglang_cpu.sh`; skipped without it, except under
CI=true, where a missing SGLang fails the test."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

from .tiny_model import build_tiny_model

pytestmark = pytest.mark.e2e  # multi-process launches

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sglang_version() -> str | None:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def test_sglang_interop(tmp_path):
    version = _sglang_version()
    if version != "0.5.23":
        reason = (f"sglang 0.5.23 is not installed (found {version}); run bash tests/rollout/install_sglang_cpu.sh")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    path = str(tmp_path / "tiny")
    build_tiny_model(path)
    proc = subprocess.run([sys.executable, "-m", "tests.rollout.sglang_interop", path], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("(a)", "(b)", "(c)", "sglang interop"))]
    print("\n".join(lines))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert [l[:3] for l in lines] == ["(a)", "(b)", "(c)", "sgl"], lines
