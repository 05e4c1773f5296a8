#!/usr/bin/env bash
# MPI bootstrap instead of torchrun (needs `pip install .[mpi]` and an MPI library):
#   launch/mpirun.sh NPROC examples/cpu_demo.yaml [section.key=value ...]
set -euo pipefail
NPROC=${1:?number of learner processes}; CONFIG=${2:?config yaml}; shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec mpirun --allow-run-as-root --oversubscribe -np "$NPROC" -x OMP_NUM_THREADS \
  python -m erc_megatron.dist.mpi train --config "$CONFIG" "$@"
