"""Grad-CAM and attention maps on a ViT-S/16-shaped graph vs a plain ONNX Runtime forward, side by side.

    python benchmarks/transformers.py [--pairs 15]

A ViT with the shape of ViT-S/16 (384 wide, 12 blocks of 6 heads, 16 x 16 patches, 224 x 224,
1000 classes; seeded random weights, which do not change the cost) is exported plainly by
torch.onnx and grafted by ``onnxcam export --from`` with the automatic layer. In one process,
with identical session options, each round runs in a shuffled order: the plain forward of the
exported file (with the caller's numpy normalisation of the uint8 photo, which onnxcam does in
the graph), and ``explain`` (the whole API path: resizing, softmax, upsampling) with Grad-CAM,
attention rollout and attention relevance for the top-1 class. The ratios are the medians of the per-round ratios
(``latency.py``'s method).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from onnxcam import Explainer
from onnxcam.contract import IMAGENET_MEAN, IMAGENET_STD
from onnxcam_export.from_onnx import Preprocessing, graft_file
from onnxcam_export.transformers import VisionTransformer

sys.path.insert(0, str(Path(__file__).parent))
from latency import quiet_options, report, time_rounds
from process import finished


def export_vit_s16(path: Path) -> None:
    torch.manual_seed(0)
    model = VisionTransformer((224, 224), 16, dim=384, depth=12, heads=6, classes=1000).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["scores"], dynamic_axes={"x": {0: "N"}})  # fmt: skip


def measure(pairs: int, folder: Path) -> dict[str, list[float]]:
    plain, grafted = folder / "vit_s16.onnx", folder / "vit_s16.cam.onnx"
    export_vit_s16(plain)
    card, _ = graft_file(plain, grafted, prep=Preprocessing.create(None, IMAGENET_MEAN, IMAGENET_STD, False))
    print(f"target layer: {card['layer']}")
    explainer = Explainer(grafted, session_options=quiet_options())
    session = ort.InferenceSession(str(plain), quiet_options(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    mean, std = (np.asarray(v, np.float32) * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))

    def forward() -> object:
        x = ((image.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None]
        return session.run(["scores"], {"x": np.ascontiguousarray(x)})

    contenders = {
        "forward": forward,
        "gradcam_1": lambda: finished([explainer.explain(image, top_k=1)]),
        "rollout_1": lambda: finished([explainer.explain(image, top_k=1, method="rollout")]),
        "attention_relevance_1": lambda: finished([explainer.explain(image, top_k=1, method="attention-relevance")]),
    }
    return time_rounds(contenders, pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=15, help="rounds (each runs every contender once)")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {ort.get_device()}, onnxruntime {ort.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, {args.pairs} rounds")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        print(report("ViT-S/16 shape, random weights", measure(args.pairs, Path(folder))))


if __name__ == "__main__":
    main()
