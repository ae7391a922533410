"""``onnxcam audit``: where does the model look, on the object or on the background?

Input: a labelled folder (one subfolder per class, named as the model's labels) and the
object's box per image (JSON ``{"path": [x0, y0, x1, y1], ...}``, pixels, inclusive). Each
image's map for the model's prediction is split into the share of its mass inside the box
(object) and outside (background). An image is flagged when the map puts less mass on the
object than a uniform map would (object share < box area share): the model looks mostly
elsewhere. Per class: accuracy, mean object and background shares, flagged count.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from onnxcam import maps, outputs
from onnxcam.api import Explainer, Request
from onnxcam.errors import OnnxcamError, describe
from onnxcam.folder import Driver, Summary
from onnxcam.image import read_rgb
from onnxcam.inputs import IMAGE_EXTENSIONS, read_small_text
from onnxcam.maps import Box

RECORDS = "audit.jsonl"


def _finite(value: object) -> bool:
    """A JSON number that is a finite float (a 20-digit integer is not a pixel: it overflows, then is refused)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and abs(value) < 2**31
    except OverflowError:
        return False


def _box(value: object) -> Box | None:
    numbers = isinstance(value, list) and len(value) == 4 and all(_finite(v) for v in value)
    if not numbers:
        return None
    x0, y0, x1, y1 = (round(v) for v in value)
    return (x0, y0, x1, y1) if 0 <= x0 <= x1 and 0 <= y0 <= y1 else None


MAX_BOXES_BYTES = 64 * 1024 * 1024


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose keys are unique: a second box for one image is refused, never silently kept."""
    found = dict(pairs)
    if len(found) < len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r} appears twice; give each image one box")
    return found


def _locator(base: Path, source: Path) -> Callable[[str], str]:
    """A key's image as a resolved path: an absolute key as it is, a relative one against the boxes file's folder
    (or the working folder, where only that holds the image; where both hold one, the key is refused as
    ambiguous). Each folder is resolved once: one full resolution per key took 102 s for 100 MB of keys (issue
    #22's probe)."""
    folders: dict[str, tuple[str, bool]] = {}  # folder as written -> (resolved, exists)
    links: dict[str, set[str]] = {}  # resolved folder -> the names of its entries that are symbolic links

    def folder_of(folder: str) -> tuple[str, bool]:
        if folder not in folders:
            real = os.path.realpath(folder or ".")
            folders[folder] = real, os.path.isdir(real)
        return folders[folder]

    def resolved(folder: str, name: str) -> str:
        real, exists = folder_of(folder)
        if real not in links:  # one listing per folder instead of one lstat per key
            with contextlib.suppress(OSError):
                links[real] = {e.name for e in os.scandir(real) if e.is_symlink()} if exists else set()
        full = os.path.join(real, name)
        return os.path.realpath(full) if name in links.get(real, ()) else full

    def locate(key: str) -> str:
        folder, name = os.path.split(key)
        if os.path.isabs(key):
            return resolved(folder, name)
        beside, here = os.path.join(base, folder), folder
        (beside_real, _), (here_real, here_is) = folder_of(beside), folder_of(here)
        if not here_is or here_real == beside_real:  # (the usual case: no system call per key)
            return resolved(beside, name)
        in_beside, in_here = (os.path.exists(os.path.join(f, name)) for f in (beside_real, here_real))
        if in_beside and in_here:
            raise OnnxcamError(f"{source}: {key!r} names an image beside the boxes file and another in the working "
                               "folder; give its path absolute, or relative to the boxes file")  # fmt: skip
        return resolved(here, name) if in_here and not in_beside else resolved(beside, name)

    return locate


def load_boxes(path: Path) -> dict[str, Box]:
    """``{"image path": [x0, y0, x1, y1]}`` with non-negative, non-inverted pixel boxes, keyed by resolved path
    (a relative key is relative to the boxes file's folder: :func:`_locator`)."""
    text = read_small_text(Path(path), "boxes file", MAX_BOXES_BYTES)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 4300-digit integer, nesting past the stack
        raise OnnxcamError(f"cannot read boxes from {path}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise OnnxcamError(f'{path}: expected {{"image path": [x0, y0, x1, y1], ...}}')
    locate = _locator(Path(path).parent, path)
    boxes = {}
    for key, value in data.items():
        box = _box(value)
        if box is None:
            raise OnnxcamError(
                f"{path}: the box of {key!r} is {value!r}; a box is [x0, y0, x1, y1], pixel numbers with "
                "0 <= x0 <= x1 and 0 <= y0 <= y1"
            )
        resolved = locate(key)
        if resolved in boxes:
            raise OnnxcamError(f"{path}: {key!r} names an image that another key names too; give each image one box")
        boxes[resolved] = box
    return boxes


def check_box(box: Box, size: tuple[int, int], path: object) -> None:
    """The box must lie inside the image (``size`` is (height, width))."""
    height, width = size
    if box[2] >= width or box[3] >= height:
        raise OnnxcamError(f"{path}: its box {list(box)} reaches outside the image ({width}x{height} pixels)")


def labelled_images(folder: Path, labels: tuple[str, ...]) -> list[tuple[Path, str]]:
    if not Path(folder).is_dir():
        raise OnnxcamError(f"{folder} is not a folder; audit needs a folder with one subfolder per class")
    classes = sorted(p for p in Path(folder).iterdir() if p.is_dir())
    if not classes:
        raise OnnxcamError(f"{folder} has no class subfolders; audit needs one subfolder per class")
    unknown = [c.name for c in classes if c.name not in labels]
    if unknown:
        raise OnnxcamError(f"subfolder {unknown[0]!r} is not one of the model's classes ({', '.join(labels[:5])}, ...)")
    return [(path, sub.name) for sub in classes for path in sorted(sub.rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS]  # fmt: skip


def audit_image(explainer: Explainer, path: Path, true_class: str, box: Box | None, out: Path, stem: str,
                request: Request | None = None) -> dict:  # fmt: skip
    """The record of one image: prediction, object share of the map, flagged; its overlay and map written."""
    if box is None:
        raise OnnxcamError(f"no box for {path} in the boxes file")
    photo = read_rgb(path)
    check_box(box, photo.shape[:2], path)
    result = explainer.run([photo], request or explainer.request(top_k=1))[0]
    top = result.maps[0]
    share = maps.box_share(top.cam, box)
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1) / top.cam.size
    # the object's box on the overlay, as the report shows it
    files, _ = outputs.save_explanation(result, out, stem, alpha=0.4, replace=False,
                                        marks=[(box, f"true: {true_class}")])  # fmt: skip
    predictions = [{"class": p.index, "label": p.label, "probability": round(p.probability, 6)}
                   for p in result.predictions]  # (the keys of explain's results.jsonl)  # fmt: skip
    target = {"class": top.index, "label": top.label, "probability": round(top.probability, 6), "method": top.method}
    return {
        "path": str(path), "predictions": predictions, "target": target, **files[0], "true_class": true_class,
        "predicted": top.label, "probability": round(top.probability, 6),
        "object_share": round(share, 6), "box_area": round(area, 6), "flagged": share < area, "error": None,
    }  # fmt: skip


def run(explainer: Explainer, folder: Path, boxes: dict[str, Box], out: Path, overwrite: bool = False,
        warnings: Sequence[str] = (), method: str | None = None) -> Iterator[dict]:  # fmt: skip
    """Audit every labelled image into ``out`` (overlays, maps, ``audit.jsonl``); yields each record, then the
    summary (its ``report``: ``index.html`` with the per-class table and ``warnings`` about the model on top).

    An image that cannot be audited (unreadable, no box, box outside it) is an error record. ``method``: the map's
    (default: the model's), unclipped (its mass is what is measured).
    """
    images = labelled_images(folder, explainer.labels)
    request = explainer.request(top_k=1, method=method, percentile=100)  # the predicted class, resolved once
    settings = {"command": "audit", "model": "sha256:" + outputs.file_digest(explainer.engine.path)[:16],
                **({} if method is None else {"method": request.methods[0]})}
    with outputs.owned(out):
        outputs.start_run(out, settings, resume=False, overwrite=overwrite, records=RECORDS)
        stems = outputs.unique_stems([str(path.parent / f"{label}-{path.name}") for path, label in images])
        outputs.write_text(out / RECORDS, "")
        driver = Driver(out, Summary(images=len(images)), RECORDS)
        for (path, label), stem in zip(images, stems.values(), strict=True):
            try:
                record = audit_image(explainer, path, label, boxes.get(str(path.resolve())), out, stem, request)
            except Exception as exc:  # one image never stops the audit
                record = {"path": str(path), "true_class": label, "error": describe(exc, path)}
            yield from driver.append([record])
        yield driver.end(warnings, parquet="none", title=f"onnxcam audit of {folder.name}", table=class_table)


def class_table(records: list[dict]) -> list[dict]:
    """The report's per-class table: :func:`summary` as rows."""
    return [{"class": label, **row} for label, row in summary(records).items()]


def summary(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per class: images, accuracy, mean object / background share, flagged count (failed images left out)."""
    done = [r for r in records if not r.get("error")]
    out = {}
    for label in sorted({r["true_class"] for r in done}):
        rows = [r for r in done if r["true_class"] == label]
        share = float(np.mean([r["object_share"] for r in rows]))
        out[label] = {
            "images": len(rows),
            "accuracy": round(float(np.mean([r["predicted"] == r["true_class"] for r in rows])), 4),
            "object_share": round(share, 4),
            "background_share": round(1 - share, 4),
            "flagged": sum(r["flagged"] for r in rows),
        }
    return out
