#!/usr/bin/env bash
# Notebook 04's equal-compute study: the same DiT (notebook 03's `tiny`), data, seed and steps for
# each prediction target, with and without min-SNR-5, and SD's eps recipe with and without offset
# noise. Two queues of one-thread processes (on 2 CPU cores that trains ~25% faster than one
# two-thread process). Then `python scripts/ship_target_study.py` copies the EMA weights into
# tutorial_lib/assets/target_study/.  Usage: scripts/train_target_study.sh [STEPS] [DEVICE]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-1500}
DEVICE=${2:-cpu}
OUT=outputs/target_study
COMMON="--model dit --preset tiny --text-encoder minilm --steps $STEPS --batch-size 128 --lr 1e-3 \
--warmup 100 --ema-decay 0.995 --seed 0 --device $DEVICE"

run() {  # name, flags
  local name=$1; shift
  if [ -f "$OUT/$name/model_index.json" ]; then echo "$name: done"; return; fi
  local resume=""; [ -e "$OUT/$name/run/checkpoints/latest" ] && resume="--resume"
  OMP_NUM_THREADS=1 .venv/bin/python -m tutorial_lib train $COMMON "$@" --out "$OUT/$name" $resume \
    > "$OUT/$name.log" 2>&1
  echo "$name: $(tail -n 1 "$OUT/$name.log")"
}
mkdir -p "$OUT"
(run eps --prediction eps; run x0 --prediction x0; run v --prediction v; run flow --prediction flow --schedule flow
 run eps_sd --prediction eps --schedule scaled_linear) &
(run eps_minsnr --prediction eps --min-snr-gamma 5; run x0_minsnr --prediction x0 --min-snr-gamma 5
 run v_minsnr --prediction v --min-snr-gamma 5; run flow_minsnr --prediction flow --schedule flow --min-snr-gamma 5
 run eps_sd_offset --prediction eps --schedule scaled_linear --offset-noise 0.1) &
wait
