"""``onnxcam audit``: where does the model look, on the object or on the background?

Input: a labelled folder (one subfolder per class, named as the model's labels) and the
object's box per image (JSON ``{"path": [x0, y0, x1, y1], ...}``, pixels, inclusive). Each
image's map for the model's prediction is split into the share of its mass inside the box
(object) and outside (background). An image is flagged when the map puts less mass on the
object than a uniform map would (object share < box area share): the model looks mostly
elsewhere. Per class: accuracy, mean object and background shares, flagged count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxcam.api import Explainer, Explanation
from onnxcam.errors import OnnxcamError
from onnxcam.image import read_rgb
from onnxcam.inputs import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ImageAudit:
    path: str
    true_class: str
    predicted: str
    probability: float
    object_share: float  # map mass inside the box / total
    box_area: float  # box pixels / image pixels
    flagged: bool  # object_share < box_area: less than a uniform map would put there


def load_boxes(path: Path) -> dict[str, list[int]]:
    try:
        boxes = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise OnnxcamError(f"cannot read boxes from {path}: {exc}") from exc
    if not isinstance(boxes, dict) or not all(isinstance(b, list) and len(b) == 4 for b in boxes.values()):
        raise OnnxcamError(f'{path}: expected {{"image path": [x0, y0, x1, y1], ...}}')
    return {str(Path(k).resolve()): [int(v) for v in b] for k, b in boxes.items()}


def labelled_images(folder: Path, labels: tuple[str, ...]) -> Iterator[tuple[Path, str]]:
    classes = sorted(p for p in Path(folder).iterdir() if p.is_dir())
    if not classes:
        raise OnnxcamError(f"{folder} has no class subfolders; audit needs one subfolder per class")
    for sub in classes:
        if sub.name not in labels:
            raise OnnxcamError(
                f"subfolder {sub.name!r} is not one of the model's classes ({', '.join(labels[:5])}, ...)"
            )
        for path in sorted(sub.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                yield path, sub.name


def audit_image(explainer: Explainer, path: Path, true_class: str, box: list[int]) -> tuple[ImageAudit, Explanation]:
    result = explainer.explain(read_rgb(path), top_k=1)
    cam, top = result.maps[0].cam, result.maps[0]
    x0, y0, x1, y1 = box
    inside = float(cam[y0 : y1 + 1, x0 : x1 + 1].sum())
    total = float(cam.sum())
    share = inside / total if total > 0 else 0.0
    area = (x1 - x0 + 1) * (y1 - y0 + 1) / cam.size
    found = ImageAudit(str(path), true_class, top.label, round(top.probability, 6), round(share, 6), round(area, 6),
                       share < area)  # fmt: skip
    return found, result


def audit(explainer: Explainer, folder: Path, boxes: dict[str, list[int]]) -> Iterator[tuple[ImageAudit, Explanation]]:
    """Every labelled image's audit and explanation, one at a time."""
    for path, label in labelled_images(folder, explainer.labels):
        box = boxes.get(str(path.resolve()))
        if box is None:
            raise OnnxcamError(f"no box for {path} in the boxes file")
        yield audit_image(explainer, path, label, box)


def summary(audits: list[ImageAudit]) -> dict[str, dict[str, float]]:
    """Per class: images, accuracy, mean object / background share, flagged count."""
    out = {}
    for label in sorted({a.true_class for a in audits}):
        rows = [a for a in audits if a.true_class == label]
        share = float(np.mean([a.object_share for a in rows]))
        out[label] = {
            "images": len(rows),
            "accuracy": round(float(np.mean([a.predicted == a.true_class for a in rows])), 4),
            "object_share": round(share, 4),
            "background_share": round(1 - share, 4),
            "flagged": sum(a.flagged for a in rows),
        }
    return out
