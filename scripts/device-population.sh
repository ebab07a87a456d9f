#!/usr/bin/env bash
# What stacking buys on a GPU: one training step of P stacked JAM members (the population
# step, bf16 autocast on CUDA) against one member's step, on the same batches, for P = 1, 8,
# 32 and 128 at batch 4,096 on 1024/4096-d embeddings held on the GPU (`raysys bench step
# --population P`; torch only, no Ray). Each P runs in its own process with its own time
# limit, so a population that does not fit (recorded in its bench.json) or a failure leaves
# the other sizes to run. Writes $OUT/population-<P>/bench.json and a summary line per P.
# About 100 s in all on an H200 (most of it process and CUDA start-up). DEVICE=cpu with
# smaller PAIRS, DIMS, BATCH, STEPS and SIZES checks the script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-population}
PY=${PYTHON:-python3}
SIZES=${SIZES:-1 8 32 128}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
status=0
run_size() {  # run_size P SECONDS [NAME EXTRA-OVERRIDE…]
  local p=$1 limit=$2 name=${3:-$1} started=$SECONDS
  timeout "$limit" env PYTHONPATH=. "$PY" -m raysys.cli bench step --device "${DEVICE:-cuda}" \
    --pairs "${PAIRS:-40000}" --dims "${DIMS:-1024,4096}" --steps "${STEPS:-10}" --population "$p" \
    --out "$OUT/population-$name" train.batch_size="${BATCH:-4096}" train.num_workers=1 "${@:4}"
  local rc=$?
  echo "[device-population] P=$name: rc $rc in $((SECONDS - started)) s"
  [ "$rc" = 0 ] || status=1
}
for p in $SIZES; do
  # Larger populations take longer to build and step; ~140 s for the four default sizes.
  if [ -n "${LIMIT:-}" ]; then limit=$LIMIT; elif [ "$p" -ge 128 ]; then limit=55
  elif [ "$p" -ge 32 ]; then limit=35; else limit=25; fi
  run_size "$p" "$limit"
done
sizes=$SIZES
# The largest size did not fit (or failed): half of it, in the time left, shows where it stops.
last=${SIZES##* }
if ! grep -q '"ratio": [0-9]' "$OUT/population-$last/bench.json" 2>/dev/null \
  && [ "$last" -ge 16 ] && [ $SECONDS -lt 100 ]; then
  run_size $((last / 2)) $((140 - SECONDS))
  sizes="$SIZES $((last / 2))"
fi
# What each member's own dropout masks cost (P mask launches per dropout layer, the price of a
# member training exactly as it would alone): P = 32 again without dropout (NODROPOUT=0 skips).
if [ "${NODROPOUT:-1}" = 1 ] && [[ " $SIZES " == *" 32 "* ]]; then
  run_size 32 35 32-nodropout train.dropout=0
  sizes="$sizes 32-nodropout"
fi
# One line per P: the figures the issue asks for, last in the log (device-all.sh keeps its tail).
"$PY" - "$OUT" $sizes <<'PYEOF' || status=1
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for p in sys.argv[2:]:
    path = out / f"population-{p}" / "bench.json"
    if not path.exists():
        print(f"P={p}: no result")
        continue
    r = json.loads(path.read_text())
    if r.get("ratio") is None:
        print(f"P={p}: {r.get('population_error')}; one member {r['step_ms']:.1f} ms")
        continue
    print(
        f"P={p}: ratio {r['ratio']:.2f}, {r['member_samples_per_s']:,.0f} member-samples/s, "
        f"{r['population_step_ms']:.1f} vs {r['step_ms']:.1f} ms, "
        f"peak {r['population_peak_memory_gib'] or float('nan'):.1f} GiB"
    )
PYEOF
exit $status
