#!/usr/bin/env bash
# Evaluation at scale on the GPU, for a machine with torch but no Ray (the borrowed device):
# score_model on 100k random test pairs (chunked exact retrieval both ways, hard negatives,
# the alignment metrics on the 1,024-image sample, every interval) with the latents on the
# GPU: seconds and peak host RSS. Writes $OUT/eval/bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-eval}
PYTHONPATH=. "${PYTHON:-python3}" -m raysys.cli bench eval --device cuda --pairs 100000 --out "$OUT/eval"
