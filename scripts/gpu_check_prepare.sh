#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what scripts/gpu_check.sh needs on the lent GPU machine, where
# nothing can be downloaded: its image has Python 3.12, torch 2.11, huggingface_hub 1.33,
# transformers 5.17, safetensors, peft, accelerate, tqdm, pytest, but no diffusers and no MiniLM.
# Both outputs lie in git-ignored paths and travel with the device tool's `carry`:
#   .whl/diffusers-*-py3-none-any.whl       the wheel of the diffusers installed here (pure Python, 6 MB);
#                                           gpu_check.sh unpacks it only where diffusers is missing
#   outputs/gpu_check_prompts.safetensors   MiniLM's embeddings of the sample stage's prompts
# Then prints the command to run there. From a fresh clone it first runs scripts/setup.sh (the
# .venv with the library and MiniLM), unless PYTHON names an interpreter that has them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then bash scripts/setup.sh; fi
py=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's library, whatever is installed
wheels=(diffusers)  # what the GPU image lacks (the device tool's KINDS.md lists what it has)

mkdir -p .whl outputs
rm -f .whl/diffusers.tar.xz  # what this script packed before it brought wheels
for name in "${wheels[@]}"; do
  version=$("$py" -c "import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))" "$name")
  rm -f .whl/"$name"-*.whl  # one version of each: gpu_check.sh would unpack them all
  # The version tested here, as a wheel that runs on any Python 3.12: pure Python, or pip finds none.
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation py --abi none --platform any -d .whl "$name==$version"
done
"$py" scripts/gpu_check.py --save-prompts outputs/gpu_check_prompts.safetensors
ls -l .whl/*.whl
echo "On the GPU machine (device tool: carry [\".whl\", \"outputs/gpu_check_prompts.safetensors\"], timeout_s 540),"
echo "in the repository root:  PYTHON=python3 bash scripts/gpu_check.sh"
