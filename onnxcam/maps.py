"""Facts about one saliency map: upsampling, min-max scaling, its peak, its mass in a box, its summary.

The maps themselves come from :mod:`onnxcam.methods` (Grad-CAM: ``L = ReLU(sum_k alpha_k A_k)``).
Full-resolution maps of large photos are hundreds of MB: the work here is float32 and in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from onnxcam.geometry import Placement

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive
FLAT = float(np.finfo(np.float32).tiny)  # a map whose range is below this is flat (empty), here and in the graph


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an ``[h, w]`` map to ``(height, width)`` (pixel centres aligned), float32."""
    height, width = size
    return cv2.resize(cam.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def normalize(cam: np.ndarray) -> tuple[np.ndarray, bool]:
    """Min-max scale a float32 map to [0, 1], in place. Returns ``(map, empty)``.

    An all-zero map (no channel votes for the class after the ReLU) stays all zero instead
    of becoming NaN. A constant positive map has no peak either: it becomes zeros and is
    flagged empty too, and so is one whose range is below float32's smallest normal number
    (scores of 1e-43 from a network that computes nothing: dividing by it would overflow).
    """
    cam = cam if cam.dtype == np.float32 else cam.astype(np.float32)
    low, high = cv2.minMaxLoc(cam)[:2] if cam.ndim == 2 else (float(cam.min()), float(cam.max()))  # (one pass)
    if not high - low >= FLAT:
        cam[...] = 0
        return cam, True
    cam -= low  # >= 0 exactly
    cam *= 1 / (high - low)
    np.minimum(cam, 1, out=cam)  # 1 / (high - low) may round a hair above 1
    return cam, False


def finest(grids: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The ``(h, w)`` with the most cells: where several layers' maps are averaged (in Python and in the graph)."""
    h, w = max(grids, key=lambda g: g[0] * g[1])
    return h, w


def aggregate(layers: list[np.ndarray]) -> np.ndarray:
    """Maps ``[T, h_i, w_i]`` of several target layers as one ``[T, h, w]`` at the finest grid: each map min-max
    scaled, upsampled bilinearly and averaged over the layers (pytorch-grad-cam's multi-layer aggregation)."""
    size = finest([m.shape[1:] for m in layers])
    scaled = [[upsample(normalize(cam.astype(np.float32))[0], size) for cam in maps] for maps in layers]
    return np.mean(np.asarray(scaled, dtype=np.float64), axis=0)


def finish(lowres: np.ndarray, size: tuple[int, int], placement: Placement | None = None,
           percentile: float | None = None) -> tuple[np.ndarray, bool]:  # fmt: skip
    """A method's low-resolution map as the ``[0, 1]`` map of ``size``: upsampled, min-max scaled (``percentile``:
    first clipped at that percentile of its values, so that a few extreme pixels do not darken the rest).

    The low-resolution minimum is subtracted first (min-max ignores it; bilinear weights sum
    to 1): a map whose values vary by 1% of their size would otherwise lose 1e-5 of its
    [0, 1] range to float32 rounding in the resize. The graph's ``saliency`` does the same.
    ``placement``: where the photo lay in the model's input when it is not stretched over it; the map is
    upsampled to the input, its padding cut away, min-max scaled over the part of the photo the model saw, and
    zero where it saw nothing (a centre crop's margins).
    """
    if percentile is not None and percentile < 100:
        lowres = np.minimum(lowres, np.percentile(lowres, percentile))
    if placement is None or placement.whole:
        return normalize(upsample(lowres - lowres.min(), size))
    full = placement.map_to_photo(upsample(lowres - lowres.min(), placement.input))
    x0, y0, x1, y1 = placement.seen
    if x1 <= x0 or y1 <= y0:  # (a photo so thin that no pixel of it survives the resize)
        return full, True
    return full, normalize(full[y0:y1, x0:x1])[1]  # (scaled in place)


def peak(cam: np.ndarray) -> tuple[int, int]:
    """(x, y) of the map's maximum, in pixels."""
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return int(x), int(y)


def box_share(cam: np.ndarray, box: Box) -> float:
    """The share of the map's mass inside ``box`` (0 for an all-zero map)."""
    x0, y0, x1, y1 = box
    total = float(cam.sum(dtype=np.float64))
    return float(cam[y0 : y1 + 1, x0 : x1 + 1].sum(dtype=np.float64)) / total if total > 0 else 0.0


def top_mass(cam: np.ndarray, share: float = 0.2) -> float:
    """The share of the map's mass in its brightest ``share`` of pixels (1 for a point, ``share`` if flat)."""
    total = float(cam.sum(dtype=np.float64))
    if total <= 0:
        return 0.0
    count = max(1, int(np.ceil(share * cam.size)))
    brightest = np.partition(cam.ravel(), cam.size - count)[cam.size - count :]
    return float(brightest.sum(dtype=np.float64)) / total


def stats(cam: np.ndarray) -> dict[str, object]:
    """What results.jsonl says about a map: its peak (x, y) and ``top20_mass``."""
    return {"peak_xy": list(peak(cam)), "top20_mass": round(top_mass(cam), 6)}
