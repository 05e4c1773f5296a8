#!/usr/bin/env bash
# What the Slurm and MPI launchers need on a Debian/Ubuntu machine (root), each step skipped when
# already there: Slurm 22.05 + munge (for launch/slurm/local_cluster.sh), Open MPI's mpirun, and
# mpi4py in the Python that runs erc_megatron (PYTHON, default `python`).
#   bash launch/install_launchers.sh
# mpi4py >= 4.1 comes as a binary wheel that finds libmpi at run time, so no MPI headers or compiler
# are needed (libopenmpi-dev only matters for building mpi4py from source).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
t0=$SECONDS
bash launch/slurm/local_cluster.sh install
if ! command -v mpirun >/dev/null; then
  [[ $(id -u) == 0 ]] || { echo "installing openmpi-bin needs root (apt-get)" >&2; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openmpi-bin >/dev/null
fi
echo "[install_launchers] $(mpirun --version 2>&1 | head -n 1)"
if ! "$PYTHON" -c "import mpi4py" 2>/dev/null; then
  "$PYTHON" -m pip install -q "mpi4py>=4.1"
fi
echo "[install_launchers] mpi4py $("$PYTHON" -c 'import mpi4py; print(mpi4py.__version__)'); done in $((SECONDS - t0)) s"
