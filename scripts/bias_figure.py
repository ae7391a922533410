"""Regenerate docs/bias.png: swapped-background test images, the biased and the fair model's maps.

.venv/bin/python scripts/bias_demo.py bias-demo && .venv/bin/python scripts/bias_figure.py bias-demo
"""

import sys
from pathlib import Path

import cv2
import numpy as np

from onnxcam import Explainer
from onnxcam.image import read_rgb
from onnxcam.outputs import write_picture_rgb
from onnxcam.overlay import comparison_sheet, overlay_rgb

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    folder = Path(sys.argv[1])
    models = {name: Explainer(folder / f"{name}.onnx") for name in ("biased", "fair")}
    rows = []
    for label in ("circle", "square", "triangle"):
        path = sorted((folder / "swapped" / label).glob("*.png"))[0]
        photo = cv2.resize(read_rgb(path), (192, 192), interpolation=cv2.INTER_NEAREST)
        tiles = [(f"test: a {label}", photo)]
        for name, explainer in models.items():
            top = explainer.explain(photo, top_k=1).maps[0]
            tiles.append((f"{name}: {top.label} {top.probability:.0%}", overlay_rgb(photo, top.cam)))
        rows.append(comparison_sheet(tiles, height=192))
    width = max(r.shape[1] for r in rows)
    write_picture_rgb(ROOT / "docs" / "bias.png", np.vstack([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)),
                                                                 constant_values=255) for r in rows]))  # fmt: skip


if __name__ == "__main__":
    main()
