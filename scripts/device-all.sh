#!/usr/bin/env bash
# Every GPU check as one prepared run, for a session that is lent the device (torch and
# transformers, no Ray): the train worker's code under NCCL (device-train.sh), the training
# step's throughput (device-step.sh) and extraction's forward with pooling (device-embed.sh).
# Each stage has its own time limit so one slow stage cannot eat the others' device time;
# results land under $OUT (the device tool brings that folder back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
status=0
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  OUT="$OUT/$name" timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[device] $name: rc $rc in $((SECONDS - started)) s" | tee -a "$OUT/stages.txt"
  tail -n 5 "$OUT/$name.log"
  [ "$rc" = 0 ] || status=1
}
stage train 240 bash scripts/device-train.sh
stage step 150 bash scripts/device-step.sh
stage embed 150 bash scripts/device-embed.sh
exit $status
