#!/usr/bin/env bash
# Single node: torchrun launches the learner ranks; with no rollout.server_urls the trainer starts
# the embedded rollout server itself (CPU), otherwise it talks to the SGLang servers you give.
#   launch/torchrun.sh NPROC examples/cpu_demo.yaml [section.key=value ...]
set -euo pipefail
NPROC=${1:?number of learner processes}; CONFIG=${2:?config yaml}; shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc_per_node "$NPROC" -m erc_megatron.cli train --config "$CONFIG" "$@"
