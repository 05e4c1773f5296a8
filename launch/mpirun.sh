#!/usr/bin/env bash
# MPI bootstrap instead of torchrun / srun (Open MPI's mpirun; `bash launch/install_launchers.sh`
# or `pip install .[mpi]` plus an MPI library). Rank 0 picks the rendezvous address and a free port
# and mpi4py broadcasts them; with no rollout.server_urls rank 0 starts the embedded rollout server.
#   launch/mpirun.sh NPROC examples/cpu_demo.yaml [section.key=value ...]
# Several hosts: MPIRUN_ARGS="--hostfile hosts --map-by ppr:8:node" launch/mpirun.sh 16 CONFIG ...
# --allow-run-as-root: containers and CI run as root; --oversubscribe: more ranks than cores on CPU.
set -euo pipefail
NPROC=${1:?number of learner processes}; CONFIG=${2:?config yaml}; shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of options
exec mpirun --allow-run-as-root --oversubscribe -np "$NPROC" -x OMP_NUM_THREADS -x PATH ${MPIRUN_ARGS:-} \
  python -m erc_megatron.dist.mpi train --config "$CONFIG" "$@"
