"""``onnxcam eval``: faithfulness metrics of the maps, per image and averaged.

Per image the explained class is the top prediction (or ``--target``); the map is computed
on the image as the model sees it (resized to its input), and every extra pass (masked,
deleted, inserted images) goes through the same ORT session as one batch. An image that
cannot be evaluated is a row with its ``error``; the others go on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onnxcam import maps, metrics
from onnxcam.api import Explainer
from onnxcam.audit import check_box
from onnxcam.engine import softmax
from onnxcam.errors import describe
from onnxcam.image import read_rgb, resize_rgb
from onnxcam.maps import Box
from onnxcam.metrics import Score


def scorer(explainer: Explainer, index: int) -> Score:
    """Class ``index``'s softmax probability for a batch of model-size uint8 RGB images."""

    def score(images: np.ndarray) -> np.ndarray:
        return softmax(explainer.engine.logits(images).astype(np.float64))[:, index]

    return score


def evaluate_image(
    explainer: Explainer,
    path: Path,
    target: str | None,
    method: str,
    steps: int,
    box: Box | None,
    road: bool = False,
) -> dict[str, object]:
    photo = read_rgb(path)
    if box is not None:
        check_box(box, photo.shape[:2], path)
    image = resize_rgb(photo, explainer.card.input_size)
    targets = [target] if target is not None else []
    top = explainer.explain(image, targets, None if targets else 1, method=method).maps[0]
    score = scorer(explainer, top.index)
    drop, increased = metrics.drop_and_increase(score, image, top.cam)
    row = {
        "path": str(path), "class": top.index, "label": top.label, "probability": round(top.probability, 6),
        "average_drop": round(drop, 4), "increase_in_confidence": increased,
        "deletion_auc": round(metrics.deletion(score, image, top.cam, steps)[0], 6),
        "insertion_auc": round(metrics.insertion(score, image, top.cam, steps)[0], 6),
    }  # fmt: skip
    if road:
        row |= metrics.road(score, image, top.cam)
    if box is not None:
        # the box is in photo pixels: the same low-resolution map, upsampled to the photo instead
        full, _ = maps.finish(top.cam_lowres, photo.shape[:2])
        hit, energy = metrics.pointing_game(full, box)
        row |= {"pointing_game": hit, "energy_pointing_game": round(energy, 6)}
    return row


def evaluate(
    explainer: Explainer,
    paths: list[Path],
    target: str | None = None,
    method: str = "gradcam",
    steps: int = 32,
    boxes: dict[str, Box] | None = None,
    road: bool = False,
) -> Iterator[dict[str, object]]:
    """One row per image, in order; a failure is the row ``{"path", "error"}``."""
    for path in paths:
        box = None if boxes is None else boxes.get(str(path.resolve()))
        try:
            yield evaluate_image(explainer, path, target, method, steps, box, road)
        except Exception as exc:  # one image never stops the evaluation
            yield {"path": str(path), "error": describe(exc, path)}


def averages(rows: list[dict[str, object]]) -> dict[str, float]:
    """Means over the images that were evaluated; % Increase in Confidence and the pointing game as percentages."""
    rows = [r for r in rows if not r.get("error")]
    out = {"images": len(rows)}
    for key in ("average_drop", "deletion_auc", "insertion_auc", "road_morf", "road_lerf", "energy_pointing_game"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = round(float(np.mean(values)), 6)
    for key in ("increase_in_confidence", "pointing_game"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key + "_percent"] = round(100 * float(np.mean(values)), 4)
    return out
