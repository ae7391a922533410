"""Grad-CAM from the graph's outputs, in numpy (Selvaraju et al., ICCV 2017).

``alpha_k = mean_hw(d y_c / d A_k)`` (the graph's ``weights`` output),
``L = ReLU(sum_k alpha_k A_k)``, bilinearly upsampled to the image and min-max scaled.
"""

from __future__ import annotations

import cv2
import numpy as np


def gradcam(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``ReLU(sum_k weights[..., k] * activations[k])`` for ``activations [C, h, w]``.

    ``weights`` is ``[C]`` or ``[T, C]``; the result is ``[h, w]`` or ``[T, h, w]``.
    """
    if activations.ndim != 3 or weights.shape[-1] != activations.shape[0]:
        raise ValueError(f"need activations [C, h, w] and weights [..., C]; got {activations.shape}, {weights.shape}")
    return np.maximum(np.tensordot(weights, activations, axes=([-1], [0])), 0)


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
