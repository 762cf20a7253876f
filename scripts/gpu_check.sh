#!/usr/bin/env bash
# The GPU check in one run of at most 7.6 minutes: CUDA tests, sampling in every dtype, a short
# DiT-B/2 training run, DiT-B/2 and DiT-XL/2 throughput and MFU against PixArt. It writes one JSON
# file, $OUT/gpu_check.json where OUT is set, else ./gpu_check.json; scripts/gpu_check.py describes
# the stages and the JSON.
#
#   bash scripts/gpu_check.sh                                 # on a machine with a GPU
#   bash scripts/gpu_check.sh --prompts FILE                  # ... without MiniLM (see gpu_check.py)
#   bash scripts/gpu_check.sh --device cpu --quick            # every stage on a CPU, tiny sizes
#
# Arguments go to every stage. Each stage is its own process under its own time limit (timeout,
# then SIGKILL 5 s later), so one that hangs or crashes loses only its own part of the JSON; its exit
# code goes into the JSON's "exit_codes" (124 or 137: killed at its limit). PYTHON picks the
# interpreter (default: .venv/bin/python if there is one, else python3). Exits 1 if any stage failed.
set -u
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the library, installed or not
export PYTHONUNBUFFERED=1
json=${OUT:+$OUT/}gpu_check.json
rm -f "$json"
failed=0

stage() {  # stage LABEL SECONDS ARGS...: one stage under its time limit, then its exit code
  local label=$1 limit=$2
  shift 2
  echo "== $label (at most $limit s)"
  timeout -k 5 "$limit" "$py" scripts/gpu_check.py --out "$json" "$@"
  local code=$?
  [ "$code" = 0 ] || failed=1
  "$py" scripts/gpu_check.py --out "$json" --record-exit "$label" "$code"
}

stage env 20 --stage env "$@"
stage tests 75 --stage tests "$@" --tests-timeout 60
stage sample 60 --stage sample "$@"
stage train 150 --stage train "$@"
stage "bench DiT-B/2" 60 --stage bench "$@" --preset DiT-B/2
stage "bench DiT-XL/2" 90 --stage bench "$@" --preset DiT-XL/2
echo "wrote $json"
exit $failed
