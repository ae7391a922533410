#!/usr/bin/env bash
# Create .venv and install onnxcam with its export and test extras, as a new user would.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "creating .venv and installing PyTorch's CPU build and onnxcam[export,test] (a few minutes the first time)"
"${PYTHON:-python3}" -m venv .venv
# PyTorch's CPU build, pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
# Off this machine, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU wheel.
.venv/bin/python -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/python -m pip install --quiet ".[export,test]"
echo "installed: $(.venv/bin/onnxcam --version)"
