"""CAM methods that need extra model passes, batched through the same ORT session.

Both take ``(engine, image, activations, classes)`` and return channel weights ``[T, C]``;
the map is then ``ReLU(sum_k w_k A_k)``.
"""

from __future__ import annotations

import cv2
import numpy as np

from onnxcam.engine import Engine, softmax


def ablation_weights(
    engine: Engine, image: np.ndarray, activations: np.ndarray, classes: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): ``w_k = (y_c - y_c^(k)) / y_c``.

    ``y_c^(k)`` is the class logit when channel k of the target layer is set to zero, as the
    paper does (pytorch-grad-cam writes ``min(A) - 1e7`` instead, for layers whose activations
    can be negative). Only the head runs (``Engine.run_head``), ``batch_size`` ablated copies
    per call; ``image`` is not needed.
    """
    channels = activations.shape[0]
    # row 0: the intact activations, in the same call as the ablated copies, so that a channel whose
    # ablation changes nothing (all zero) gets exactly 0, whatever rounding the batch size brings
    scores = np.empty((channels + 1, len(classes)))
    for start in range(0, channels + 1, batch_size):
        rows = np.arange(start, min(channels + 1, start + batch_size))
        batch = np.repeat(activations[None], len(rows), axis=0)
        ablate = rows > 0
        batch[np.flatnonzero(ablate), rows[ablate] - 1] = 0
        scores[rows] = engine.run_head(batch)[:, classes]
    base, ablated = scores[0], scores[1:]
    return ((base[None] - ablated) / base[None]).T


def score_weights(
    engine: Engine, image: np.ndarray, activations: np.ndarray, classes: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    """Score-CAM (Wang et al., CVPR-W 2020), the variant of pytorch-grad-cam's ``ScoreCAM``.

    Each channel, bilinearly upsampled to the model input and min-max scaled to [0, 1],
    multiplies the uint8 RGB input (so masked-out pixels are black); the channel's score is
    the class's softmax probability on that masked image, and ``w = softmax_k(score)``.
    ``image`` is the resized uint8 ``[H, W, 3]`` the model sees.
    """
    height, width = image.shape[:2]
    masks = np.stack([cv2.resize(a.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
                      for a in activations])  # fmt: skip
    low, high = masks.min(axis=(1, 2), keepdims=True), masks.max(axis=(1, 2), keepdims=True)
    masks = np.where(high > low, (masks - low) / np.where(high > low, high - low, 1), 0)
    scores = np.empty((len(masks), len(classes)))
    for start in range(0, len(masks), batch_size):
        chunk = masks[start : start + batch_size]
        masked = np.rint(image[None].astype(np.float32) * chunk[..., None]).astype(np.uint8)
        logits = engine.logits(masked).astype(np.float64)
        scores[start : start + len(chunk)] = softmax(logits, axis=1)[:, classes]
    return softmax(scores, axis=0).T


def reciprocam_maps(
    engine: Engine, image: np.ndarray, activations: np.ndarray, classes: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """ReciproCAM (Byun & Lee, 2022; OpenVINO XAI's white-box default for CNNs), gradient-free: ``[T, h, w]``.

    For each location (i, j) of the target layer, a copy of ``A [C, h, w]`` that keeps only that location (every
    channel; the other locations zero) goes through the head; the map of class c at (i, j) is c's softmax
    probability on that copy. Only the head runs (``Engine.run_head``), ``batch_size`` copies per call, so the
    map costs h*w head passes and no backward; ``image`` is not needed.
    """
    channels, height, width = activations.shape
    cells = height * width
    scores = np.empty((cells, len(classes)))
    for start in range(0, cells, batch_size):
        rows = np.arange(start, min(cells, start + batch_size))
        batch = np.zeros((len(rows), channels, height, width), activations.dtype)
        y, x = rows // width, rows % width
        batch[np.arange(len(rows)), :, y, x] = activations[:, y, x].T
        scores[rows] = softmax(engine.run_head(batch).astype(np.float64), axis=1)[:, classes]
    return scores.T.reshape(len(classes), height, width)
