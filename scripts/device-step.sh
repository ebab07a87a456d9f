#!/usr/bin/env bash
# GPU throughput of the training step (samples/s, ms per step, peak GPU memory), for a machine
# with torch but no Ray (the borrowed device):
# the training step alone with 200k pairs of 1024/4096-d embeddings held on the GPU, for each
# objective, at the default model size. Writes $OUT/step-<objective>/bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-step}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for objective in con negcon spread; do
  PYTHONPATH=. "${PYTHON:-python3}" -m raysys.cli bench step --device cuda --pairs 200000 --dims 1024,4096 \
    --steps 200 --out "$OUT/step-$objective" train.objective="$objective" train.num_workers=1
done
