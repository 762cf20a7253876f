#!/usr/bin/env bash
# The GPU check in one run of at most 8 minutes: an import preflight, FSDP2 + bf16 + activation
# checkpointing + DCP on one NCCL rank, bf16 training steps of the MoE + masking DiT, the MMDiT and
# the UNet, sampling in every dtype, the CUDA tests, a short compiled DiT-B/2 training run, DiT-B/2
# and DiT-XL/2 throughput and MFU against PixArt. It writes one JSON file, $OUT/gpu_check.json where
# OUT is set, else ./gpu_check.json; scripts/gpu_check.py describes the stages and the JSON.
#
#   bash scripts/gpu_check.sh                                 # on a machine with a GPU
#   bash scripts/gpu_check.sh --device cpu --quick            # every stage on a CPU, tiny sizes
#
# On the lent GPU machine (its own python3 and torch; nothing can be downloaded there), first run
# scripts/gpu_check_prepare.sh here: it puts into .whl/ the wheels of the packages that machine lacks
# and MiniLM's embeddings of the prompts into outputs/gpu_check_prompts.safetensors; carry both. This
# script unpacks each wheel whose package this Python lacks into a temporary folder on PYTHONPATH
# (pure-Python wheels: unpacking is installing), and samples with the stored embeddings if that file
# is there (gpu_check.py --prompts).
#
# Arguments go to every stage. Each stage is its own process under its own time limit (timeout,
# then SIGKILL 2 s later), all within BUDGET seconds (default 470), so one that hangs or crashes
# loses only its own part of the JSON; its exit code goes into the JSON's "exit_codes" (124 or 137:
# killed at its limit; -1: no time was left for it). The preflight comes first: if the packages
# every stage needs do not import, the run stops there, in seconds. PYTHON picks the interpreter
# (default: .venv/bin/python if there is one, else python3). Exits 1 if any stage failed.
set -u
cd "$(dirname "$0")/.."
deadline=$((SECONDS + ${BUDGET:-470}))
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the library, installed or not
export PYTHONUNBUFFERED=1
json=${OUT:+$OUT/}gpu_check.json
rm -f "$json"
failed=0

if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
  for whl in .whl/*.whl; do
    name=${whl##*/}
    name=${name%%-*}  # a wheel's file name starts with its distribution's name
    if "$py" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null; then
      echo "wheels: $name is installed; $whl left alone"
    else
      echo "wheels: unpacking $whl into $site"
      "$py" -m zipfile -e "$whl" "$site" || { echo "wheels: cannot unpack $whl" >&2; exit 1; }
    fi
  done
  export PYTHONPATH="$site:$PYTHONPATH"
fi
prompts=outputs/gpu_check_prompts.safetensors
if [ -f "$prompts" ]; then set -- --prompts "$prompts" "$@"; fi  # a --prompts given later wins

stage() {  # stage LABEL SECONDS ARGS...: one stage under its time limit, then its exit code
  local label=$1 limit=$2 code
  shift 2
  local left=$((deadline - SECONDS - 2))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "== $label: skipped, the run's ${BUDGET:-470} s are spent"
    code=-1
  else
    echo "== $label (at most $limit s)"
    timeout -k 2 "$limit" "$py" scripts/gpu_check.py --out "$json" "$@"
    code=$?
  fi
  [ "$code" = 0 ] || failed=1
  "$py" scripts/gpu_check.py --out "$json" --record-exit "$label" "$code"
  return "$((code != 0))"
}

if ! stage preflight 30 --stage preflight "$@"; then
  echo "The import preflight failed (its error is in $json): every later stage needs those packages." >&2
  exit 1
fi
stage env 20 --stage env "$@"
stage fsdp 45 --stage fsdp "$@"
stage models 50 --stage models "$@"
stage sample 55 --stage sample "$@"
stage tests 60 --stage tests "$@" --tests-timeout 50
stage train 100 --stage train "$@"
stage "bench DiT-B/2" 45 --stage bench "$@" --preset DiT-B/2
stage "bench DiT-XL/2" 60 --stage bench "$@" --preset DiT-XL/2
echo "wrote $json in $SECONDS s"
exit $failed
