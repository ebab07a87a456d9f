#!/usr/bin/env bash
# GPU throughput of the training step (samples/s, ms per step, peak GPU memory), for a machine
# with torch but no Ray (the borrowed device): the training step alone with 200k pairs of
# 1024/4096-d embeddings held on the GPU, at the default model size and batch, for each
# objective, in one process: `--population 3` times one member of each objective (Con,
# NegCon, Spread: `single` in bench.json) and the three stacked, taking turns. Writes
# $OUT/step/bench.json. (Batch 4,096 and larger populations: device-population.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-step}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
PYTHONPATH=. "${PYTHON:-python3}" -m raysys.cli bench step --device cuda --pairs 200000 \
  --dims 1024,4096 --steps 100 --population 3 --out "$OUT/step" train.num_workers=1
