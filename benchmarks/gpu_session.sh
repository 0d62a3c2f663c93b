#!/usr/bin/env bash
# One device-tool call on `nvidia-h200-x2` that re-measures everything that needs a
# GPU, each step under its own timeout so one failure cannot sink the rest.
# Usage (device tool): bash benchmarks/gpu_session.sh   (writes under $OUT)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jmoe_gpu_out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
step() { echo "== $1 ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax,flax,optax;print('jax',jax.__version__,'flax',flax.__version__,'optax',optax.__version__,jax.devices())"
} >> "$LOG" 2>&1

step "moe_layer (GPU 0)"
CUDA_VISIBLE_DEVICES=0 timeout "${T_LAYER:-120}" python3 -m benchmarks.moe_layer --quick \
  --out "$OUT/h200_moe_layer.json" >> "$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"

step "gmm decode (GPU 0)"
CUDA_VISIBLE_DEVICES=0 timeout "${T_DECODE:-60}" python3 -m benchmarks.gmm --cases decode \
  --methods dense hbm_read jmoe mgpu --quick --out "$OUT/h200_gmm_decode.json" \
  >> "$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"

step "expert parallel (2 GPUs)"
timeout "${T_EP:-170}" python3 -m benchmarks.ep --out "$OUT/h200x2_ep.json" \
  --variants ${EP_VARIANTS:-1dev ep_dropless ep_all_to_all ep_all_gather all_to_all jmoe_dispatch ragged_all_to_all} \
  >> "$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"

step "train_lm MoE vs dense (GPU 0)"
CUDA_VISIBLE_DEVICES=0 timeout "${T_TRAIN:-270}" python3 examples/train_lm.py --preset h200 \
  --compare --time-budget "${TRAIN_BUDGET:-90}" --no-progress --run-dir /tmp/h200_train \
  --out-json /tmp/h200_train/out/h200_train_lm.json >> "$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
tar -czf "$OUT/train_lm.tgz" -C /tmp/h200_train out 2>/dev/null
grep -v "^    @" "$LOG" | tail -60
