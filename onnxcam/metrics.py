"""Faithfulness metrics of a saliency map, on any scoring function (one ORT session in practice).

``score(images)`` takes uint8 RGB ``[B, H, W, 3]`` at the model's input size and returns the
explained class's probability for each image; maps are ``[H, W]`` in [0, 1] at that size.
Every extra pass of one image's metric goes through ``score`` as one batch.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from onnxcam import maps

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


CHUNK = 16  # perturbed images per pass through the session: bounded memory whatever the step count


def _curve(score: Score, start: np.ndarray, finish: np.ndarray, cam: np.ndarray, steps: int) -> np.ndarray:
    """Scores as the pixels of ``finish`` replace those of ``start`` in decreasing map order, :data:`CHUNK` frames
    per pass (10,000 steps in one batch took 22 GB in issue #22's probe)."""
    order = np.argsort(-cam.ravel(), kind="stable")
    counts = np.linspace(0, order.size, steps + 1).round().astype(int)
    scores = []
    for first in range(0, len(counts), CHUNK):
        frames = []
        for count in counts[first : first + CHUNK]:
            frame = start.reshape(-1, 3).copy()
            frame[order[:count]] = finish.reshape(-1, 3)[order[:count]]
            frames.append(frame.reshape(start.shape))
        scores.append(np.asarray(score(np.stack(frames)), dtype=np.float64))
    return np.concatenate(scores)


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


def pointing_game(cam: np.ndarray, box: maps.Box) -> tuple[bool, float]:
    """(peak inside the box, share of the map's mass inside the box): pointing game (Zhang et al.,
    ECCV 2016) and its energy-based form (Wang et al., Score-CAM, 2020). Box: x0, y0, x1, y1, inclusive."""
    x0, y0, x1, y1 = box
    x, y = maps.peak(cam)
    return bool(x0 <= x <= x1 and y0 <= y <= y1), maps.box_share(cam, box)


# Noisy linear imputation (Rong et al., ICML 2022, ROAD): a removed pixel is the weighted mean of
# its 8 neighbours (1/6 side, 1/12 diagonal; weights over the neighbours inside the image),
# solved jointly for all removed pixels, plus Gaussian noise.
_NEIGHBOURS = [((dy, dx), 1 / 6 if dy == 0 or dx == 0 else 1 / 12)
               for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]  # fmt: skip


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[y, x] = a[y + dy, x + dx]``, zero outside."""
    h, w = a.shape[:2]
    padded = np.zeros((h + 2, w + 2, *a.shape[2:]), a.dtype)
    padded[1:-1, 1:-1] = a
    return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def impute(image: np.ndarray, removed: np.ndarray, noise: float = 0.01, seed: int = 0, tol: float = 1e-3) -> np.ndarray:
    """Fill ``removed`` pixels of a uint8 RGB image by noisy linear imputation; returns uint8.

    Solves ``s_i x_i - sum_j w_ij x_j = 0`` for the removed pixels (``s_i``: the weights of
    i's neighbours inside the image; known pixels fixed) by conjugate gradients on that
    symmetric positive definite system, then adds noise of ``noise`` x 255 standard deviation.
    """
    known = ~removed
    x = np.where(known[..., None], image.astype(np.float64), 0.0)
    ones = np.ones(removed.shape)
    total = sum(w * _shift(ones, dy, dx) for (dy, dx), w in _NEIGHBOURS)[..., None]
    unknown = removed[..., None].astype(np.float64)

    def weighted(a: np.ndarray) -> np.ndarray:
        return sum(w * _shift(a, dy, dx) for (dy, dx), w in _NEIGHBOURS)

    def operator(v: np.ndarray) -> np.ndarray:  # L_UU v, for v zero on known pixels
        return unknown * (total * v - weighted(v))

    b = unknown * weighted(x)
    v = np.zeros_like(x)
    r = b - operator(v)
    p, rr = r.copy(), float((r * r).sum())
    scale = max(float((b * b).sum()), 1e-12)
    for _ in range(10 * int(removed.sum()) + 10):
        if rr <= tol**2 * scale:
            break
        ap = operator(p)
        step = rr / float((p * ap).sum())
        v += step * p
        r -= step * ap
        rr, previous = float((r * r).sum()), rr
        p = r + (rr / previous) * p
    filled = x + v + unknown * np.random.default_rng(seed).normal(0, noise * 255, x.shape)
    return np.clip(np.rint(filled), 0, 255).astype(np.uint8)


ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def road(score: Score, image: np.ndarray, cam: np.ndarray, percentiles: tuple[int, ...] = ROAD_PERCENTILES
         ) -> dict[str, object]:  # fmt: skip
    """ROAD (Rong et al., ICML 2022): the class probability after removing the ``p``% most (MoRF,
    lower is better) or least (LeRF, higher is better) relevant pixels, imputed as above."""
    order = np.argsort(-cam.ravel(), kind="stable")
    frames = {}
    for kind, ranked in (("morf", order), ("lerf", order[::-1])):
        for p in percentiles:
            removed = np.zeros(cam.size, bool)
            removed[ranked[: round(cam.size * p / 100)]] = True
            frames[(kind, p)] = impute(image, removed.reshape(cam.shape))
    scores = dict(zip(frames, np.asarray(score(np.stack(list(frames.values()))), dtype=np.float64), strict=True))
    out: dict[str, object] = {}
    for kind in ("morf", "lerf"):
        curve = [scores[(kind, p)] for p in percentiles]
        out[f"road_{kind}"] = float(np.mean(curve))
        out[f"road_{kind}_curve"] = [round(float(c), 6) for c in curve]
    return out
