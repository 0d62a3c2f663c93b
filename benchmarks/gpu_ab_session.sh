#!/usr/bin/env bash
# One device call: the Mosaic kernels' checks, then the layer benchmark (with its
# profile) on this tree and on a base tree, alternating, in the same call.
# Usage (device tool): BASE=.base ORDER="new base" bash benchmarks/gpu_ab_session.sh
#   BASE: a directory holding the base tree's `jmoe/` package (untracked copy).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/jmoe_gpu_out}; mkdir -p "$OUT"; LOG="$OUT/session.log"
BASE=${BASE:-.base}; ROOT=$PWD
step() { echo "== $1 ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
python3 -c "import jax;print('jax',jax.__version__,jax.devices())" >> "$LOG" 2>&1
ln -sfn "$ROOT/benchmarks" "$BASE/benchmarks"
if [ "${CHECK:-1}" = 1 ]; then
  step "mosaic_probe --check"
  timeout "${T_CHECK:-200}" python3 -m benchmarks.mosaic_probe --check \
    --out "$OUT/mosaic_check.json" >> "$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
fi
i=0
for v in ${ORDER:-new base}; do
  i=$((i+1)); step "moe_layer $v ($i)"
  if [ "$v" = base ]; then dir="$BASE"; else dir="$ROOT"; fi
  (cd "$dir" && timeout "${T_LAYER:-170}" python3 -m benchmarks.moe_layer --quick \
     ${PROFILE:---profile} ${METHODS:+--methods $METHODS} --out "$OUT/moe_layer_${v}_$i.json") >> "$LOG" 2>&1
  echo "rc=$?" | tee -a "$LOG"
done
grep -v "^    @" "$LOG" | tail -${TAIL:-80}
