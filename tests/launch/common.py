"""Helpers of the launcher tests (imported by conftest.py and the test modules)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "launch" / "slurm" / "local_cluster.sh"
FIGURES: list[str] = []  # one line per launch, printed in the terminal summary


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str, how: str) -> None:
    """Skip locally, fail in CI."""
    msg = f"{what} is not available; set it up with: {how}"
    if in_ci():
        pytest.fail(f"CI=true: {msg}", pytrace=False)
    pytest.skip(msg)


def slurm_dir() -> Path:
    return Path(os.environ.get("ERC_SLURM_DIR", "/tmp/erc-slurm"))
