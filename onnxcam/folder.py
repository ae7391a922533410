"""Explaining many images: batches streamed through one session, decoding overlapped with ORT.

Per image it writes the files of :func:`onnxcam.outputs.save_explanation`, appends one JSON
line per (image, target) to ``results.jsonl`` (or one line with the image's error), and
keeps nothing else in memory, so a long run stays flat. Whatever goes wrong with one image
becomes that image's error record; the run goes on.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxcam import maps, outputs
from onnxcam.api import Explainer, Explanation
from onnxcam.errors import OnnxcamError, describe
from onnxcam.image import MAX_BYTES, MAX_PIXELS, read_rgb
from onnxcam.overlay import HEAT_WEIGHT
from onnxcam.progress import progress_bar
from onnxcam.report import write_report


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
    overwrite: bool = False
    max_pixels: int = MAX_PIXELS
    max_bytes: int = MAX_BYTES

    def settings(self, model: Path) -> dict[str, object]:
        """What the outputs depend on: a resumed run must ask exactly this again."""
        return {
            "model": "sha256:" + outputs.file_digest(model)[:16],
            "target": list(self.targets),
            "top_k": self.top_k,
            "method": list(self.methods),
            "eigen_smooth": self.eigen_smooth,
            "aug_smooth": self.aug_smooth,
            "alpha": self.alpha,
            "panel": self.panel,
        }


@dataclass
class Summary:
    images: int = 0
    explained: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0


def complete_records(records: list[dict]) -> dict[str, list[dict]]:
    """Records per image whose records are complete and whose files all exist (``--resume`` keeps these)."""
    by_path: dict[str, list[dict]] = {}
    broken: set[str] = set()
    for record in records:
        if record.get("error") or not all(Path(f).is_file() for f in outputs.record_files(record)):
            broken.add(record["path"])
        else:
            by_path.setdefault(record["path"], []).append(record)
    return {p: v for p, v in by_path.items() if p not in broken}


def _decode(paths: list[Path], options: Options) -> list[tuple[Path, np.ndarray | str]]:
    decoded: list[tuple[Path, np.ndarray | str]] = []
    for path in paths:
        try:
            decoded.append((path, read_rgb(path, options.max_pixels, options.max_bytes)))
        except Exception as exc:  # one unreadable file is that file's error record
            decoded.append((path, describe(exc, path)))
    return decoded


def _records(path: Path, stem: str, result: Explanation, files: list[dict], sheets: list[str]) -> list[dict]:
    height, width = result.image_rgb.shape[:2]
    predictions = [{"class": p.index, "label": p.label, "probability": round(p.probability, 6)}
                   for p in result.predictions]  # fmt: skip
    extra = {"sheets": sheets} if sheets else {}
    return [
        {
            "path": str(path),
            "stem": stem,
            "size": [width, height],
            "predictions": predictions,
            "target": {
                "class": m.index,
                "label": m.label,
                "probability": round(m.probability, 6),
                "logit": round(m.logit, 6),
                "method": m.method,
            },
            "stats": maps.stats(m.cam),
            "empty_map": m.empty,
            **f,
            **extra,
            "error": None,
        }
        for m, f in zip(result.maps, files, strict=True)
    ]


class _Batch:
    """Explains one decoded batch and writes its files; every failure stays with its image."""

    def __init__(self, explainer: Explainer, options: Options, stems: dict[Path, str], inputs: set[str],
                 replace: bool) -> None:  # fmt: skip
        self.explainer, self.options, self.stems, self.inputs, self.replace = (
            explainer, options, stems, inputs, replace
        )  # fmt: skip

    def explain(self, images: list[np.ndarray]) -> list[Explanation | str]:
        o = self.options
        call = lambda batch: self.explainer.explain_batch(  # noqa: E731
            batch, o.targets, o.top_k, method=o.methods, eigen_smooth=o.eigen_smooth, aug_smooth=o.aug_smooth
        )
        try:
            return list(call(images))
        except Exception:  # one image may break the batch: find it by explaining one at a time
            if len(images) == 1:
                raise
        results: list[Explanation | str] = []
        for image in images:
            try:
                results.append(call([image])[0])
            except Exception as exc:
                results.append(describe(exc))
        return results

    def save(self, path: Path, result: Explanation) -> list[dict]:
        o, stem = self.options, self.stems[path]
        names = [f"{outputs.map_name(stem, m.index, m.label, m.method)}.png" for m in result.maps]
        clash = [n for n in names if os.path.realpath(o.out / n) in self.inputs]
        if clash:
            raise OnnxcamError(f"writing {o.out / clash[0]} would overwrite an input image; choose another --out")
        files, sheets = outputs.save_explanation(result, o.out, stem, o.alpha, o.panel, o.sheets, self.replace)
        return _records(path, stem, result, files, sheets)

    def records(self, decoded: list[tuple[Path, np.ndarray | str]]) -> list[dict]:
        good = [(p, image) for p, image in decoded if isinstance(image, np.ndarray)]
        try:
            explained = self.explain([image for _, image in good]) if good else []
        except Exception as exc:
            explained = [describe(exc)] * len(good)
        results = dict(zip([p for p, _ in good], explained, strict=True))
        lines: list[dict] = []
        for path, image in decoded:
            found = results.get(path, image)
            if isinstance(found, str):
                lines.append({"path": str(path), "error": found})
                continue
            try:
                lines += self.save(path, found)
            except Exception as exc:  # a file that cannot be written fails this image only
                lines.append({"path": str(path), "error": describe(exc, path)})
        return lines


def run(
    explainer: Explainer, paths: list[Path], options: Options, progress: bool = False, warnings: list[str] = ()
) -> Iterator[dict]:
    """Explain ``paths`` into ``options.out``; yields every record as it is written, then a summary.

    Bad images become error records and the run goes on. The folder is locked for the run;
    an earlier run there is refused unless ``resume`` (same settings: its complete images
    are skipped, their records kept) or ``overwrite`` (its files are deleted first). At the
    end, ``index.html`` shows every record, with ``warnings`` about the model on top.
    """
    out = options.out
    explainer.target_codes(options.targets, options.top_k)  # bad classes fail before any work
    with outputs.owned(out):
        kept = outputs.start_run(out, options.settings(explainer.engine.path), options.resume, options.overwrite)
        done = complete_records(kept)
        kept_lines = [json.dumps(r) + "\n" for records in done.values() for r in records]
        outputs.write_text(out / outputs.RESULTS, "".join(kept_lines))
        stems = outputs.unique_stems(paths, {p: records[0]["stem"] for p, records in done.items()
                                             if isinstance(records[0].get("stem"), str)})  # fmt: skip
        todo = [p for p in paths if str(p) not in done]
        batch = _Batch(explainer, options, stems, {os.path.realpath(p) for p in paths}, replace=options.resume)
        summary = Summary(images=len(paths), skipped=len(paths) - len(todo))
        start = time.perf_counter()
        bar = progress_bar(len(todo)) if progress else nullcontext(None)
        log = (out / outputs.RESULTS).open("a", encoding="utf-8")
        with bar as advance, ThreadPoolExecutor(max_workers=1) as pool, log:
            size = options.batch_size
            chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
            pending: Future | None = pool.submit(_decode, chunks[0], options) if chunks else None
            for i, chunk in enumerate(chunks):
                decoded = pending.result()
                pending = pool.submit(_decode, chunks[i + 1], options) if i + 1 < len(chunks) else None
                lines = batch.records(decoded)
                failed = {r["path"] for r in lines if r.get("error")}
                summary.failed += len(failed)
                summary.explained += len(chunk) - len(failed)
                log.write("".join(json.dumps(r) + "\n" for r in lines))  # one write per batch: whole records
                log.flush()
                yield from lines
                if advance:
                    advance(len(chunk))
        summary.seconds = time.perf_counter() - start
        report = write_report(read_records(out), out, list(warnings))
        yield {"summary": {**vars(summary), "report": str(report)}}


def read_records(out: Path) -> list[dict]:
    """Every complete record of ``results.jsonl`` (for the report)."""
    return outputs.read_records(out / outputs.RESULTS, strict=False)
