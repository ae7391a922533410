"""``onnxcam eval``: faithfulness metrics of the maps, per image and averaged.

Per image the explained class is the top prediction (or ``--target``); the map is computed
on the image as the model sees it (resized to its input), and every extra pass (masked,
deleted, inserted images) goes through the same ORT session as one batch. On a detector, the
row is the pointing game of each kept box instead: its map's peak inside the box it explains,
and the share of its map there. An image that cannot be evaluated is a row with its
``error``; the others go on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onnxcam import maps, metrics
from onnxcam.api import Explainer, Prepared
from onnxcam.audit import check_box
from onnxcam.engine import softmax
from onnxcam.errors import OnnxcamError, describe
from onnxcam.image import read_rgb
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
    prepared = explainer.prepare(photo)
    image = prepared.model_input  # the metrics perturb the model's input, as the pipeline feeds it
    targets = [target] if target is not None else []
    top = explainer.explain(Prepared.as_input(image), targets, None if targets else 1, method=method,
                           percentile=100).maps[0]  # (the metrics rank the map's own values: unclipped)
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
        # the box is in photo pixels: the same low-resolution map, taken back to the photo instead
        full, _ = maps.finish(top.cam_lowres, photo.shape[:2], prepared.placement)
        hit, energy = metrics.pointing_game(full, box)
        row |= {"pointing_game": hit, "energy_pointing_game": round(energy, 6)}
    return row


def evaluate_detections(
    explainer: Explainer, path: Path, method: str, conf: float | None, iou: float | None
) -> dict[str, object]:
    """A detector's image: the share of its kept boxes whose map peaks inside the box it explains, and the
    mean share of each map's mass inside its box."""
    photo = read_rgb(path)
    found = explainer.explain(photo, method=method, conf=conf, iou=iou, percentile=100).maps
    if not found:
        raise OnnxcamError(f"{path}: the detector kept no box above the confidence threshold; lower --conf")
    height, width = photo.shape[:2]
    games = [metrics.pointing_game(m.cam, _pixel_box(m.box, width, height)) for m in found]
    hits, energies = zip(*games, strict=True)
    return {"path": str(path), "detections": len(found), "box_pointing_game": round(float(np.mean(hits)), 6),
            "box_energy_pointing_game": round(float(np.mean(energies)), 6)}  # fmt: skip


def _pixel_box(box: tuple[float, float, float, float], width: int, height: int) -> Box:
    """A detection's box (x1, y1, x2, y2) as the inclusive pixels it covers, within the image."""
    x1, y1, x2, y2 = (round(v) for v in box)
    return max(0, x1), max(0, y1), min(width - 1, x2), min(height - 1, y2)


def evaluate(
    explainer: Explainer,
    paths: list[Path],
    target: str | None = None,
    method: str | None = None,
    steps: int = 32,
    boxes: dict[str, Box] | None = None,
    road: bool = False,
    conf: float | None = None,
    iou: float | None = None,
) -> Iterator[dict[str, object]]:
    """One row per image, in order; a failure is the row ``{"path", "error"}``. ``conf``, ``iou``: a detector's."""
    for path in paths:
        box = None if boxes is None else boxes.get(str(path.resolve()))
        try:
            if explainer.card.task == "detection":
                yield evaluate_detections(explainer, path, method, conf, iou)
                continue
            yield evaluate_image(explainer, path, target, method, steps, box, road)
        except Exception as exc:  # one image never stops the evaluation
            yield {"path": str(path), "error": describe(exc, path)}


def averages(rows: list[dict[str, object]]) -> dict[str, float]:
    """Means over the images that were evaluated; % Increase in Confidence and the pointing game as percentages."""
    rows = [r for r in rows if not r.get("error")]
    out = {"images": len(rows)}
    for key in ("average_drop", "deletion_auc", "insertion_auc", "road_morf", "road_lerf", "energy_pointing_game",
                "box_pointing_game", "box_energy_pointing_game"):  # fmt: skip
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = round(float(np.mean(values)), 6)
    for key in ("increase_in_confidence", "pointing_game"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key + "_percent"] = round(100 * float(np.mean(values)), 4)
    return out
