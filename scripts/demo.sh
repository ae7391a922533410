#!/usr/bin/env bash
# One command from a fresh clone: set up, export the offline pretrained model, explain the bundled photos.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/onnxcam export --arch efficientnet_lite0
.venv/bin/onnxcam explain examples/chelsea.png examples/coffee.png --model models/efficientnet_lite0.onnx --top-k 2 --overwrite
echo "overlays and raw maps are in onnxcam-out/"
