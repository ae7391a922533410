"""Explaining many images: batches streamed through one session, decoding overlapped with ORT.

Per image it writes the overlay PNG and raw ``.npy`` of every target (and ``--panel``),
appends one JSON line per (image, target) to ``results.jsonl`` (or one line with the error),
and keeps nothing else in memory, so a long run stays flat.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxcam.api import Explainer, Explanation, output_paths, save, save_sheets
from onnxcam.errors import OnnxcamError
from onnxcam.image import MAX_PIXELS, atomic_write, read_rgb, write_png_rgb
from onnxcam.overlay import HEAT_WEIGHT, comparison_sheet, heatmap_rgb, overlay_rgb

RESULTS = "results.jsonl"


@dataclass
class Options:
    """What to explain and write, as the CLI's flags say."""

    out: Path
    targets: list[str] = field(default_factory=list)
    top_k: int | None = None
    methods: list[str] = field(default_factory=lambda: ["gradcam"])
    eigen_smooth: bool = False
    aug_smooth: bool = False
    alpha: float = HEAT_WEIGHT
    batch_size: int = 8
    panel: bool = False
    sheets: bool = False
    resume: bool = False
    max_pixels: int = MAX_PIXELS


@dataclass
class Summary:
    images: int = 0
    explained: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0


class Progress:
    """One line on a terminal: done/total, images per second, time left. Silent elsewhere."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done, self.start = total, enabled, 0, time.perf_counter()

    def update(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0
        sys.stderr.write(f"\r{self.done}/{self.total} images  {rate:.1f} img/s  ETA {eta:.0f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def unique_stems(paths: list[Path]) -> dict[Path, str]:
    """Output name stems: the file stem, with -2, -3, ... for repeats (over the whole input list)."""
    stems: dict[Path, str] = {}
    seen: dict[str, int] = {}
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        stems[path] = path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}"
    return stems


def map_stats(cam: np.ndarray) -> dict[str, object]:
    """Peak (x, y) in image pixels, and the share of the map's mass in its brightest 20% of pixels."""
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    values = np.sort(cam.ravel())[::-1]
    total = float(values.sum())
    top = float(values[: max(1, int(np.ceil(0.2 * values.size)))].sum())
    return {"peak_xy": [int(x), int(y)], "top20_mass": round(top / total, 6) if total > 0 else 0.0}


def completed(out: Path) -> dict[str, list[str]]:
    """Lines of ``results.jsonl`` per image whose records are complete and whose files all exist."""
    lines: dict[str, list[str]] = {}
    broken: set[str] = set()
    path = out / RESULTS
    if not path.is_file():
        return {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the tail of an interrupted write
        files = [record.get(k) for k in ("overlay", "map", "panel") if record.get(k)]
        if record.get("error") or not all(Path(f).is_file() for f in files):
            broken.add(record["path"])
        else:
            lines.setdefault(record["path"], []).append(line)
    return {p: v for p, v in lines.items() if p not in broken}


def _decode(paths: list[Path], max_pixels: int) -> list[tuple[Path, np.ndarray | str]]:
    decoded: list[tuple[Path, np.ndarray | str]] = []
    for path in paths:
        try:
            decoded.append((path, read_rgb(path, max_pixels)))
        except OnnxcamError as exc:
            decoded.append((path, str(exc)))
    return decoded


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def _records(path: Path, result: Explanation, files: list[dict[str, str]]) -> list[dict[str, object]]:
    height, width = result.image_rgb.shape[:2]
    predictions = [{"class": p.index, "label": p.label, "probability": round(p.probability, 6)}
                   for p in result.predictions]  # fmt: skip
    return [
        {
            "path": str(path),
            "size": [width, height],
            "predictions": predictions,
            "target": {
                "class": m.index,
                "label": m.label,
                "probability": round(m.probability, 6),
                "logit": round(m.logit, 6),
                "method": m.method,
            },
            "stats": map_stats(m.cam),
            "empty_map": m.empty,
            **f,
            "error": None,
        }
        for m, f in zip(result.maps, files, strict=True)
    ]


def save_panels(result: Explanation, out: Path, stem: str, alpha: float) -> list[str]:
    """Per map: original | heat map | overlay side by side, captioned with label and probability."""
    paths = []
    for m in result.maps:
        overlay_path, _ = output_paths(out, stem, m)
        path = overlay_path.with_name(overlay_path.stem + ".panel.png")
        tiles = [("photo", result.image_rgb), (f"{m.method} heat map", heatmap_rgb(m.cam)),
                 (f"{m.label} {m.probability:.1%}", overlay_rgb(result.image_rgb, m.cam, alpha))]  # fmt: skip
        write_png_rgb(path, comparison_sheet(tiles, height=min(480, result.image_rgb.shape[0])))
        paths.append(str(path))
    return paths


def run(explainer: Explainer, paths: list[Path], options: Options, progress: bool = False) -> Iterator[dict]:
    """Explain ``paths`` into ``options.out``; yields every record as it is written, then a summary.

    Bad images become error records and the run goes on. With ``options.resume``, images
    whose records and files are complete are skipped (their records are kept).
    """
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    explainer.target_codes(options.targets, options.top_k)  # bad classes fail before any work
    stems = unique_stems(paths)
    inputs = {os.path.realpath(p) for p in paths}
    done = completed(out) if options.resume else {}
    results = out / RESULTS
    kept = [line for p in paths if str(p) in done for line in done[str(p)]]
    atomic_write(results, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8"))
    todo = [p for p in paths if str(p) not in done]
    summary = Summary(images=len(paths), skipped=len(paths) - len(todo))
    bar = Progress(len(todo), progress)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool, results.open("a", encoding="utf-8") as log:
        batches = list(_batches(todo, max(1, options.batch_size)))
        pending: Future | None = pool.submit(_decode, batches[0], options.max_pixels) if batches else None
        for i in range(len(batches)):
            decoded = pending.result()
            pending = pool.submit(_decode, batches[i + 1], options.max_pixels) if i + 1 < len(batches) else None
            good = [(p, image) for p, image in decoded if isinstance(image, np.ndarray)]
            lines = [{"path": str(p), "error": image} for p, image in decoded if isinstance(image, str)]
            summary.failed += len(lines)
            if good:
                explained = explainer.explain_batch(
                    [image for _, image in good], options.targets, options.top_k,
                    method=options.methods, eigen_smooth=options.eigen_smooth, aug_smooth=options.aug_smooth,
                )  # fmt: skip
                for (path, _), result in zip(good, explained, strict=True):
                    stem = stems[path]
                    clash = [f for m in result.maps for f in output_paths(out, stem, m)
                             if os.path.realpath(f) in inputs]  # fmt: skip
                    if clash:
                        raise OnnxcamError(f"writing would overwrite the input {clash[0]}; choose another --out")
                    files = save(result, out, stem, options.alpha)
                    if options.panel:
                        for f, panel in zip(files, save_panels(result, out, stem, options.alpha), strict=True):
                            f["panel"] = panel
                    records = _records(path, result, files)
                    if options.sheets:
                        sheets = save_sheets(result, out, stem, options.alpha)
                        for record in records:
                            record["sheets"] = sheets
                    lines += records
                    summary.explained += 1
            log.write("".join(json.dumps(r) + "\n" for r in lines))  # one write per batch: whole records
            log.flush()
            yield from lines
            bar.update(len(batches[i]))
    bar.close()
    summary.seconds = time.perf_counter() - start
    yield {"summary": vars(summary)}


def read_records(out: Path) -> list[dict]:
    """Every complete record of ``results.jsonl`` (for the report)."""
    records = []
    for line in (out / RESULTS).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
