#!/usr/bin/env bash
# The train worker's own code on a machine with torch but no Ray (the borrowed GPU): the input
# standardisation all-reduced on the device, batches held on the GPU and gathered through
# pinned host buffers (data_on_device true and false), steps with the global-batch gather
# under bf16 autocast, validation on the device, checkpoints and a resume from the middle one,
# all under a real torch.distributed group: NCCL on CUDA, gloo with DEVICE=cpu (what the test
# suite runs). Extra arguments go to `python -m raysys.train.selfcheck` (e.g. --world 2, or
# config overrides such as train.objective=spread). Writes $OUT/<setting>/device-train.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/device-train}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}  # one machine: NCCL needs no network
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  sizes=(--pairs 100000 --dims 1024,4096 --steps 300 --batch 4096 --eval-every 100)
  settings=(true false)
else
  sizes=(--pairs 2048 --dims 64,96 --steps 24 --batch 256 --eval-every 8 --val-pairs 256)
  settings=(auto)
fi
for setting in "${settings[@]}"; do
  PYTHONPATH=. "$PYTHON" -m raysys.train.selfcheck --device "$DEVICE" --data-on-device "$setting" \
    --out "$OUT/data-on-device-$setting" "${sizes[@]}" "$@"
done
