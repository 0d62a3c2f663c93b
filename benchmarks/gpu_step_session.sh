#!/usr/bin/env bash
# One device-tool call (nvidia-h200, carry .whl): the GPU test classes, then the
# training-step profiles of issue 13 (train_step_profile) for the h200 preset and a
# candidate resize, MoE and dense. Each step under its own timeout; writes under $OUT.
# Usage: bash benchmarks/gpu_step_session.sh [tests] [profile] [resize]
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/jmoe_gpu_out}; mkdir -p "$OUT"; LOG="$OUT/session.log"
step() { echo "== $1 ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
want() { [ $# -eq 0 ] || [[ " $ARGS " == *" $1 "* ]]; }
ARGS="$*"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax,flax,optax;print('jax',jax.__version__,'flax',flax.__version__,'optax',optax.__version__,jax.devices())"
} >> "$LOG" 2>&1
if want tests; then
  step "gpu tests (test_gmm, test_attention; xdist -n 8)"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/xdist/*.whl >> "$LOG" 2>&1
  PYTHONPATH=/tmp/site:$PWD timeout "${T_TESTS:-260}" python3 -m pytest -q -rs -n 8 \
    -p no:cacheprovider -m gpu tests/test_gmm.py tests/test_attention.py \
    > "$OUT/h200_gmm_gpu_tests.log" 2>&1; echo "rc=$?" | tee -a "$LOG"
  tail -5 "$OUT/h200_gmm_gpu_tests.log" >> "$LOG"
fi
prof() {  # name, args...
  local name=$1; shift
  step "profile $name"
  PYTHONPATH=$PWD timeout "${T_PROF:-110}" python3 -m benchmarks.train_step_profile "$@" \
    --out "$OUT/profile_$name.json" >> "$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
}
if want profile; then
  prof h200_moe --preset h200
  prof h200_dense --preset h200 --dense
fi
if want resize; then
  R="d_model=2048 num_heads=16 d_ff=4096 ${RESIZE_EXTRA:-}"
  prof r2048_moe --preset h200 --set $R
  prof r2048_dense --preset h200 --dense --set $R
fi
grep -v "^    @" "$LOG" | tail -90
