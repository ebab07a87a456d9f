#!/usr/bin/env bash
# Every GPU check as one prepared run, for a session that is lent the device (torch and
# transformers, no Ray): P stacked members against one (device-population.sh, first: the
# figure issue 16 asks of a GPU), the train worker's code under NCCL (device-train.sh), the
# training step's throughput per objective (device-step.sh), extraction's forward with pooling
# (device-embed.sh) and evaluation of 100k pairs (device-eval.sh).
# Each stage has its own time limit so one slow stage cannot eat the others' device time
# (at most 495 s in all; on 2026-11-30 on an H200 population took 69 s, train 58 s, step 17 s,
# eval 18 s, and embed ran out of its then 90 s). The stages work in a scratch folder; $OUT receives only a few
# small files (the device tool brings back a handful): the GPU and versions, each stage's
# outcome and log tail, and device.tgz with every log and JSON result.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/device}
WORK=$(mktemp -d)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
status=0
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  OUT="$WORK/$name" timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "[device] $name: rc $rc in $((SECONDS - started)) s" | tee -a "$OUT/stages.txt"
  tail -n 8 "$WORK/$name.log" | tee -a "$OUT/stages.txt"
  [ "$rc" = 0 ] || status=1
}
stage population 140 bash scripts/device-population.sh
stage train 100 bash scripts/device-train.sh
stage step 45 bash scripts/device-step.sh
stage embed 150 bash scripts/device-embed.sh
stage eval 60 bash scripts/device-eval.sh
(cd "$WORK" && find . -type f \( -name '*.json' -o -name '*.log' -o -name '*.csv' \) -print \
  | tar czf - -T -) > "$OUT/device.tgz"
rm -rf "$WORK"
exit $status
