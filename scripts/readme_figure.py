"""Regenerate docs/overlays.png, the README's picture: photo | Grad-CAM overlay, for both bundled photos.

.venv/bin/python scripts/readme_figure.py models/efficientnet_lite0.onnx
"""

import sys
from pathlib import Path

import cv2
import numpy as np

from onnxcam import Explainer
from onnxcam.outputs import write_picture_rgb
from onnxcam.overlay import overlay_rgb

ROOT = Path(__file__).resolve().parents[1]


def panel(explainer: Explainer, photo: Path, height: int = 260) -> np.ndarray:
    result = explainer.explain(photo)
    top = result.maps[0]
    tiles = [result.image_rgb, overlay_rgb(result.image_rgb, top.cam)]
    tiles = [
        cv2.resize(t, (round(t.shape[1] * height / t.shape[0]), height), interpolation=cv2.INTER_AREA) for t in tiles
    ]
    text = f"{top.label} {top.probability:.0%}"
    cv2.putText(tiles[1], text, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2, cv2.LINE_AA)
    return np.hstack(tiles)


def main() -> None:
    explainer = Explainer(sys.argv[1])
    rows = [panel(explainer, ROOT / "examples" / name) for name in ("chelsea.png", "coffee.png")]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    write_picture_rgb(ROOT / "docs" / "overlays.png", np.vstack(rows))


if __name__ == "__main__":
    main()
