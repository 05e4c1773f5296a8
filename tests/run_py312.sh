#!/usr/bin/env bash
# Python 3.12 + megatron-core 0.19.x: the ops, parallel-equivalence, end-to-end train, console and
# MoE (conversion at EP x TP / PP, config, EP2 training) tests, in their own venv (the main suite runs
# on Python 3.11 + megatron-core 0.16.1).
#   bash tests/run_py312.sh [pytest args]
# Env: PYTHON312 (interpreter, default python3.12 or pyenv's 3.12.1), VENV312 (default .venv312,
# reused when present), MCORE_VERSION (default 0.19.2).
# PyPI's Linux torch 2.13.0 for cp312 is the CUDA build: the wheel is 527 MB and it cannot even be
# imported without its nvidia-* / triton dependencies (libcudnn.so.9 etc. are linked), so they are
# installed too: about 2.7 GB of wheels, 4.7 GB installed. On a CPU machine torch then runs on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# the first Python 3.12 that runs (a pyenv shim answers to `python3.12` even where 3.12 is not selected)
PY=${PYTHON312:-}
if [ -z "$PY" ]; then
  for cand in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
    if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY=$cand; break; fi
  done
fi
[ -n "$PY" ] || { echo "run_py312: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2; exit 1; }
VENV=${VENV312:-.venv312}
MCORE=${MCORE_VERSION:-0.19.2}
t0=$SECONDS

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# reuse the venv as is when it already holds this checkout and the asked megatron-core
if ! "$VENV/bin/python" - "$MCORE" <<'PY' 2>/dev/null
import os, sys
from importlib.metadata import version
import erc_megatron, torch
assert version("megatron-core") == sys.argv[1] and torch.__version__.startswith("2.13.0")
assert os.path.realpath(erc_megatron.__file__).startswith(os.path.realpath("erc_megatron") + os.sep)
PY
then
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e ".[dev]" "megatron-core==$MCORE"
fi
"$VENV/bin/python" - "$((SECONDS - t0))" <<'PY'
import sys, torch
from importlib.metadata import version
print(f"run_py312: venv ready in {sys.argv[1]} s: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"megatron-core {version('megatron-core')}")
PY

OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/ops tests/train/test_parallel_equivalence.py tests/train/test_train_e2e.py tests/utils/test_console.py \
  tests/model/test_moe_config.py tests/model/test_moe_distributed.py tests/train/test_moe_train_e2e.py "$@"
echo "run_py312: total $((SECONDS - t0)) s"
