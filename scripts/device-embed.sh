#!/usr/bin/env bash
# What pooling every hidden state costs on a GPU over the forward alone (rows/s of each and
# their ratio), for a machine with torch and transformers but no Ray (the borrowed
# device): the extract actor's batch function (every layer pooled, weights in
# extract.precision -- auto: bfloat16 on cuda -- under bf16 autocast, uint8 pixels normalised
# on the GPU) against a bare forward loop, for a random ViT-B/16 and a random 12-layer
# BERT-base, at two batch sizes. Neither Ray nor pyarrow is needed; without Pillow the image
# half is skipped (bench.json says so) and the text half still runs.
# PYTHON picks the interpreter (default python3); PRECISION the weight dtype (default auto).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-embed}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for batch in 64 256; do
  HF_HUB_OFFLINE=1 PYTHONPATH=. "$PY" -m raysys.cli bench embed --device cuda --rows 2048 \
    --out "$OUT/batch-$batch" extract.batch_size="$batch" extract.precision="${PRECISION:-auto}"
done
