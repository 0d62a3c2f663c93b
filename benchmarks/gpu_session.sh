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

step "expert parallel (2 GPUs), Mixtral-like"
timeout "${T_EP:-170}" python3 -m benchmarks.ep --out "$OUT/h200x2_ep.json" \
  --variants ${EP_VARIANTS:-1dev ep_dropless ep_dropless_ragged ep_all_to_all ep_all_gather all_to_all jmoe_dispatch jmoe_dispatch_ragged ragged_all_to_all ragged_all_to_all_split} \
  >> "$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"

step "expert parallel (2 GPUs), DeepSeek-like (256 experts, top-8, 7168->2048)"
timeout "${T_EP_DS:-200}" python3 -m benchmarks.ep --out "$OUT/h200x2_ep_deepseek.json" \
  --d-model 7168 --d-ff 2048 --experts 256 --top-k 8 \
  --variants 1dev ep_dropless ep_dropless_ragged all_to_all jmoe_dispatch jmoe_dispatch_ragged ragged_all_to_all_split \
  >> "$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"

step "train_lm h200, experts over both GPUs, MoE vs dense (data parallel)"
timeout "${T_TRAIN_EP:-330}" python3 examples/train_lm.py --preset h200 --compare \
  --expert-parallel 2 --steps 300 --no-progress --run-dir /tmp/h200_ep \
  --out-json /tmp/h200_ep/out/h200x2_train_lm.json >> "$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
cp /tmp/h200_ep/out/h200x2_train_lm.json "$OUT/" 2>/dev/null

step "train_lm MoE vs dense (GPU 0)"
CUDA_VISIBLE_DEVICES=0 timeout "${T_TRAIN:-270}" python3 examples/train_lm.py --preset h200 \
  --compare --time-budget "${TRAIN_BUDGET:-90}" --no-progress --run-dir /tmp/h200_train \
  --out-json /tmp/h200_train/out/h200_train_lm.json >> "$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
tar -czf "$OUT/train_lm.tgz" -C /tmp/h200_train out 2>/dev/null
grep -v "^    @" "$LOG" | tail -60
