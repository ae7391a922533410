"""From a low-resolution map to the image: bilinear upsampling and min-max scaling.

The maps themselves come from :mod:`onnxcam.methods` (Grad-CAM: ``L = ReLU(sum_k alpha_k A_k)``).
"""

from __future__ import annotations

import cv2
import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``."""
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an ``[h, w]`` map to ``(height, width)`` (pixel centres aligned)."""
    height, width = size
    return cv2.resize(cam.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def normalize(cam: np.ndarray) -> tuple[np.ndarray, bool]:
    """Min-max scale to [0, 1]. Returns ``(map, empty)``; ``empty`` when the map is all zero.

    An all-zero map (no channel votes for the class after the ReLU) stays all zero instead
    of becoming NaN. A constant positive map has no peak either: it is returned as zeros
    and flagged empty too.
    """
    low, high = float(cam.min()), float(cam.max())
    if high <= low:
        return np.zeros_like(cam, dtype=np.float32), True
    return ((cam - low) / (high - low)).astype(np.float32), False
