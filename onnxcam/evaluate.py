"""``onnxcam eval``: faithfulness metrics of the maps, per image and averaged.

Per image the explained class is the top prediction (or ``--target``); the map is computed
on the image as the model sees it (resized to its input), and every extra pass (masked,
deleted, inserted images) goes through the same ORT session as one batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onnxcam import cam as cams
from onnxcam import metrics
from onnxcam.api import Explainer, softmax
from onnxcam.image import read_rgb, resize_rgb
from onnxcam.metrics import Score


def scorer(explainer: Explainer, index: int) -> Score:
    """Class ``index``'s softmax probability for a batch of model-size uint8 RGB images."""

    def score(images: np.ndarray) -> np.ndarray:
        logits = explainer.engine.run(images, np.zeros((len(images), 1), np.int64)).logits
        return softmax(logits.astype(np.float64))[:, index]

    return score


def evaluate_image(
    explainer: Explainer,
    path: Path,
    target: str | None,
    method: str,
    steps: int,
    box: list[int] | None,
    road: bool = False,
) -> dict[str, object]:
    photo = read_rgb(path)
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
        full, _ = cams.normalize(cams.upsample(top.cam_lowres, photo.shape[:2]))
        hit, energy = metrics.pointing_game(full, box)
        row |= {"pointing_game": hit, "energy_pointing_game": round(energy, 6)}
    return row


def evaluate(
    explainer: Explainer,
    paths: list[Path],
    target: str | None = None,
    method: str = "gradcam",
    steps: int = 32,
    boxes: dict[str, list[int]] | None = None,
    road: bool = False,
) -> Iterator[dict[str, object]]:
    for path in paths:
        box = None if boxes is None else boxes.get(str(path.resolve()))
        yield evaluate_image(explainer, path, target, method, steps, box, road)


def averages(rows: list[dict[str, object]]) -> dict[str, float]:
    """Means over images; % Increase in Confidence and the pointing game as percentages."""
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
