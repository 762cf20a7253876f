#!/usr/bin/env bash
# Notebook 06's MoE against dense at equal training FLOPs, over three training seeds: the notebook's
# recipe (v, min-SNR-5, 350 steps of batch 128, its learning rate and warm-up) for the dense `tiny`
# DiT and the `tiny-moe` (capacity factor 1: the same FLOPs plus the router's 0.07%), seeds 0, 1, 2;
# each scored on the class prompts at n = 1,000 (25 DDIM steps, guidance 3, sampling seed 0). Two
# queues of one-thread processes (dense, MoE). Records, one JSON per run with both commands, in
# tutorial_lib/assets/records/moe_dense_seeds/, which notebook 06 reads.
# Usage: scripts/moe_dense_seeds.sh [DEVICE]      (about 15 minutes on a 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cpu}
OUT=outputs/moe_dense_seeds
RECORDS=tutorial_lib/assets/records/moe_dense_seeds
mkdir -p "$OUT" "$RECORDS"

run() {  # name, preset, seed
  local name=$1 preset=$2 seed=$3
  local folder="$OUT/$name-seed$seed" record="$RECORDS/$name-seed$seed.json"
  [ -f "$record" ] && { echo "$name seed $seed: done"; return; }
  local train="python -m tutorial_lib train --model dit --preset $preset --text-encoder minilm --prediction v \
--min-snr-gamma 5 --steps 350 --batch-size 128 --lr 1e-3 --warmup 87 --seed $seed --device $DEVICE --out $folder"
  local evaluate="python -m tutorial_lib evaluate --model $folder --prompts class --per-prompt 100 \
--inference-steps 25 --guidance-scale 3 --seed 0 --device $DEVICE"
  OMP_NUM_THREADS=1 .venv/bin/$train > "$folder.log" 2>&1
  OMP_NUM_THREADS=1 .venv/bin/$evaluate > "$folder.eval.json" 2>> "$folder.log"
  .venv/bin/python - "$folder" "$record" "$train" "$evaluate" <<'PY'
import json, sys
folder, record, train, evaluate = sys.argv[1:]
info = json.load(open(f"{folder}/model_index.json"))["_tutorial_lib"]
text = open(f"{folder}.eval.json").read()  # evaluate's JSON, then its "[evaluate] done in ..." line
metrics = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]
json.dump({"train_command": train, "evaluate_command": evaluate, "train_seconds": info["train_seconds"],
           "final_loss": info["final_loss"], "metrics": metrics}, open(record, "w"), indent=1)
PY
  echo "$name seed $seed: recorded in $record"
}
(for seed in 0 1 2; do run dense tiny $seed; done) &
(for seed in 0 1 2; do run moe tiny-moe $seed; done) &
wait
