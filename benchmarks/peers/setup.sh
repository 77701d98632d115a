#!/usr/bin/env bash
# The optional peers environment of benchmarks/peers/run.py: PyTorch (CPU), pyDVL 0.10 and kronfluence 1.0.1.
# Never a test or CI dependency. Creates benchmarks/peers/.venv (git-ignored).
#
# torch: a CPU build (about 700 MB) from PyTorch's CPU index, unless TORCH_SPEC names a wheel or version that
# pip can already reach (e.g. TORCH_SPEC=torch==2.13.0 where that CPU wheel is on the machine). The default
# PyPI torch is a CUDA build of several GB.
# kronfluence is installed without its dependencies: it asks for torchvision but never imports it, and a
# PyPI torchvision does not load beside a CPU torch of another release.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
if [ -n "${TORCH_SPEC:-}" ]; then
  "$PIP" install -q "$TORCH_SPEC"
else
  "$PIP" install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$PIP" install -q "numpy<2" accelerate einops einconv opt-einsum safetensors tqdm "pyDVL[influence]==0.10.0" "zarr<3.1"
"$PIP" install -q --no-deps "kronfluence==1.0.1"
"$VENV/bin/python" -c "import torch, pydvl, kronfluence; print('peers env: torch', torch.__version__, '| pyDVL', pydvl.__version__, '| kronfluence', kronfluence.__version__)"
