#!/usr/bin/env bash
# The CPU demo end to end: tiny model + data (made locally), then ERC-DAPO with the learner at
# TP=2 x PP=2 in 4 processes and the embedded rollout server, then the plot.
#   bash launch/cpu_demo.sh [section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO_DIR:-runs/demo_model}
export OMP_NUM_THREADS=1
if [ ! -f "$DEMO/model/config.json" ]; then
  erc-megatron make-demo-model --out "$DEMO"
fi
torchrun --standalone --nproc_per_node 4 -m erc_megatron.cli train --config examples/cpu_demo.yaml \
  model.path="$DEMO/model" data.train_path="$DEMO/train.jsonl" data.val_path="$DEMO/val.jsonl" "$@"
echo "metrics: runs/cpu_demo/metrics.jsonl, plot: runs/cpu_demo/metrics.png, TensorBoard: runs/cpu_demo/tensorboard"
