#!/usr/bin/env bash
# Prepare, on this (CPU) machine, the two files that scripts/gpu_check.sh needs on the lent GPU
# machine, where nothing can be downloaded and no diffusers or MiniLM is installed; both lie in
# git-ignored paths and travel with the device tool's `carry`:
#   .whl/diffusers.tar.xz                    the installed diffusers, packed (1.9 MB; its wheel is 6.1 MB)
#   outputs/gpu_check_prompts.safetensors    MiniLM's embeddings of the sample stage's prompts
# Then prints the command to run there (device tool: carry [".whl", "outputs/gpu_check_prompts.safetensors"],
# timeout_s 560; the JSON comes back as $OUT/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
site=$("$py" -c "import diffusers, pathlib; print(pathlib.Path(diffusers.__file__).parents[1])")
version=$("$py" -c "import diffusers; print(diffusers.__version__)")
mkdir -p .whl outputs
(cd "$site" && tar --exclude=__pycache__ -cf - diffusers "diffusers-$version.dist-info" | xz -9) > .whl/diffusers.tar.xz
"$py" scripts/gpu_check.py --save-prompts outputs/gpu_check_prompts.safetensors
echo "On the GPU machine, in the repository root:"
echo "  mkdir -p /tmp/site && tar -xJf .whl/diffusers.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site &&" \
     "PYTHON=python3 bash scripts/gpu_check.sh --prompts outputs/gpu_check_prompts.safetensors"
