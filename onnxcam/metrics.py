"""Faithfulness metrics of a saliency map, on any scoring function (one ORT session in practice).

``score(images)`` takes uint8 RGB ``[B, H, W, 3]`` at the model's input size and returns the
explained class's probability for each image; maps are ``[H, W]`` in [0, 1] at that size.
Every extra pass of one image's metric goes through ``score`` as one batch.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Score = Callable[[np.ndarray], np.ndarray]


def average_drop(full: float, masked: float) -> float:
    """Average Drop term (Chattopadhyay et al., WACV 2018): ``max(0, Y - O) / Y`` in percent.

    ``Y`` is the class probability on the image, ``O`` on the image multiplied by the map.
    """
    return 100.0 * max(0.0, full - masked) / full if full > 0 else 0.0


def drop_and_increase(score: Score, image: np.ndarray, cam: np.ndarray) -> tuple[float, bool]:
    """(Average Drop %, whether the confidence increased) for one image and its [0, 1] map."""
    masked = np.rint(image.astype(np.float64) * cam[..., None]).astype(np.uint8)
    full, on_map = (float(v) for v in score(np.stack([image, masked])))
    return average_drop(full, on_map), on_map > full


def _curve(score: Score, start: np.ndarray, finish: np.ndarray, cam: np.ndarray, steps: int) -> np.ndarray:
    """Scores as the pixels of ``finish`` replace those of ``start`` in decreasing map order."""
    order = np.argsort(-cam.ravel(), kind="stable")
    counts = np.linspace(0, order.size, steps + 1).round().astype(int)
    frames = []
    for count in counts:
        frame = start.reshape(-1, 3).copy()
        frame[order[:count]] = finish.reshape(-1, 3)[order[:count]]
        frames.append(frame.reshape(start.shape))
    return np.asarray(score(np.stack(frames)), dtype=np.float64)


def auc(curve: np.ndarray) -> float:
    """Trapezoid-rule area under scores taken at evenly spaced fractions 0 .. 1 of the pixels."""
    return float((curve.sum() - (curve[0] + curve[-1]) / 2) / (len(curve) - 1))


def deletion(score: Score, image: np.ndarray, cam: np.ndarray, steps: int = 32) -> tuple[float, np.ndarray]:
    """Deletion AUC (Petsiuk et al., BMVC 2018, RISE): the most salient pixels first become the
    image's mean colour ("mean grey"), in ``steps`` equal steps; lower is better."""
    grey = np.broadcast_to(np.rint(image.reshape(-1, 3).mean(axis=0)).astype(np.uint8), image.shape)
    curve = _curve(score, image, grey, cam, steps)
    return auc(curve), curve


def insertion(
    score: Score, image: np.ndarray, cam: np.ndarray, steps: int = 32, blur_sigma: float = 5.0
) -> tuple[float, np.ndarray]:
    """Insertion AUC (RISE): from a Gaussian-blurred copy (sigma 5 px, as RISE's 11x11 kernel),
    the most salient pixels first get their original values, in ``steps`` equal steps; higher is better."""
    blurred = cv2.GaussianBlur(image, (0, 0), blur_sigma)
    curve = _curve(score, blurred, image, cam, steps)
    return auc(curve), curve


def pointing_game(cam: np.ndarray, box: list[int]) -> tuple[bool, float]:
    """(peak inside the box, share of the map's mass inside the box): pointing game (Zhang et al.,
    ECCV 2016) and its energy-based form (Wang et al., Score-CAM, 2020). Box: x0, y0, x1, y1, inclusive."""
    x0, y0, x1, y1 = box
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    total = float(cam.sum())
    energy = float(cam[y0 : y1 + 1, x0 : x1 + 1].sum()) / total if total > 0 else 0.0
    return bool(x0 <= x <= x1 and y0 <= y <= y1), energy
