"""Heat-map overlay: JET colour map blended over the photo (both RGB)."""

from __future__ import annotations

import cv2
import numpy as np

HEAT_WEIGHT = 0.4  # the classic recipe: 0.4 heat map + 0.6 photo


def heatmap_rgb(cam: np.ndarray) -> np.ndarray:
    """JET colours for a [0, 1] map, as uint8 RGB (OpenCV's colour maps come out BGR)."""
    if cam.ndim != 2:
        raise ValueError(f"need a 2-D map, got shape {cam.shape}")
    scaled = np.clip(np.rint(cam * 255), 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def overlay_rgb(photo_rgb: np.ndarray, cam: np.ndarray, alpha: float = HEAT_WEIGHT) -> np.ndarray:
    """``alpha * heat + (1 - alpha) * photo``, uint8 RGB of the photo's size."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if cam.shape != photo_rgb.shape[:2]:
        raise ValueError(f"map {cam.shape} and photo {photo_rgb.shape[:2]} differ in size")
    blend = alpha * heatmap_rgb(cam).astype(np.float32) + (1 - alpha) * photo_rgb.astype(np.float32)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def comparison_sheet(tiles: list[tuple[str, np.ndarray]], height: int = 240) -> np.ndarray:
    """A row of equally tall RGB images, each captioned with its name (e.g. one overlay per method)."""
    row = []
    for name, image in tiles:
        width = round(image.shape[1] * height / image.shape[0])
        tile = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        tile = np.vstack([np.full((28, width, 3), 255, np.uint8), tile])
        cv2.putText(tile, name, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        row += [tile, np.full((height + 28, 4, 3), 255, np.uint8)]
    return np.hstack(row[:-1])
