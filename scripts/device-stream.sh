#!/usr/bin/env bash
# How a streamed worker's reading scales with a node's cores: `raysys bench stream` (no Ray,
# no GPU: pyarrow and numpy on the CPU) at 1024/4096-d, batch 4,096, with 1, 4, 8 and 16
# windows made at once (`--readers`). A GPU node's many cores are what a streamed run needs
# (tens of batches a second); the project's own box has 2. Each count writes, times and
# removes its own view under $OUT/readers-R; the summary lines come last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-stream}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# Not a stage of device-all.sh, which already takes most of a call's 600 s: about 2 minutes
# on its own, for a session with device time left after it.
READERS=${READERS:-1 4 8 16}
status=0
for r in $READERS; do
  PYTHONPATH=. "$PY" -m raysys.cli bench stream --pairs "${PAIRS:-80000}" \
    --dims "${DIMS:-1024,4096}" --readers "$r" --out "$OUT/readers-$r" \
    train.batch_size="${BATCH:-4096}" > "$OUT/readers-$r.log" 2>&1 || status=1
done
for r in $READERS; do  # the summary, in the order run
  grep -h "^\[bench stream\]" "$OUT/readers-$r.log" || status=1
done
exit $status
