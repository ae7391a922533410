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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import numpy as np

from onnxcam import maps, outputs, pixels
from onnxcam.api import Explainer, Explanation, Prepared, Request, TargetMap
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
    methods: list[str] = field(default_factory=list)  # none: the model's default (methods.resolve)
    eigen_smooth: bool = False
    aug_smooth: bool = False
    alpha: float = HEAT_WEIGHT
    colormap: str = "jet"  # one of overlay.COLORMAPS
    batch_size: int = 8
    panel: bool = False
    sheets: bool = False
    picture: str = "png"  # format of overlays, panels and sheets: png, jpg or webp
    resume: bool = False
    overwrite: bool = False
    max_pixels: int = MAX_PIXELS
    max_bytes: int = MAX_BYTES
    conf: float | None = None  # a detector's suppression thresholds (None: the graph's defaults)
    iou: float | None = None
    mask: Path | None = None  # a segmenter's region, an image file the size of every image
    like: list[Path] = field(default_factory=list)  # a similarity model's references: images or .npy embeddings
    prompts: list[str] = field(default_factory=list)  # an image-text model's: text prompts, references too
    both: bool = False  # and each reference image explained against each image (its likeness to it)
    attribution: pixels.Settings = field(default_factory=pixels.Settings)  # Integrated Gradients', SmoothGrad's
    percentile: float | None = None  # each map clipped at this percentile (None: the pixel methods' 99)

    @property
    def mirrors(self) -> list[str]:
        """The reference images that ``both`` explains too (paths of ``like`` that are not ``.npy`` files)."""
        return [str(p) for p in self.like if Path(p).suffix.lower() != ".npy"] if self.both else []

    def request(self, explainer: Explainer) -> Request:
        """What to explain, resolved and checked against ``explainer``'s model once (:meth:`Explainer.request`)."""
        if self.both and not self.mirrors:
            raise OnnxcamError("--both explains each --like image against each image too: give --like IMAGE "
                               "(a .npy of embeddings or a prompt has no image to explain)")  # fmt: skip
        return explainer.request(self.targets, self.top_k, method=self.methods, eigen_smooth=self.eigen_smooth,
                                 aug_smooth=self.aug_smooth, conf=self.conf, iou=self.iou, mask=self.mask,
                                 like=self.like, prompts=self.prompts, attribution=self.attribution,
                                 percentile=self.percentile)  # fmt: skip

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
            "colormap": self.colormap,
            "panel": self.panel,
            "overlay_format": self.picture,
            "conf": self.conf,
            "iou": self.iou,
            **({} if self.mask is None else {"mask": "sha256:" + outputs.file_digest(self.mask)[:16]}),
            **({"like": ["sha256:" + outputs.file_digest(p)[:16] for p in self.like]} if self.like else {}),
            **({"prompts": list(self.prompts)} if self.prompts else {}),
            **({"both": True} if self.both else {}),
            **({} if self.attribution == pixels.Settings() else {"attribution": self._attribution_settings()}),
            **({} if self.percentile is None else {"percentile": self.percentile}),
        }

    def _attribution_settings(self) -> dict[str, object]:
        """The many-input pixel methods' settings as the run's settings record them (a baseline file by digest)."""
        given = vars(self.attribution) | {}
        if str(given["baseline"]) not in pixels.BASELINES:
            given["baseline"] = "sha256:" + outputs.file_digest(Path(given["baseline"]))[:16]
        return given


@dataclass
class Summary:
    images: int = 0
    explained: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0


def complete_records(records: list[dict], out: Path) -> dict[str, list[dict]]:
    """Records per image whose records are complete and whose files all exist in ``out`` (``--resume`` keeps
    these)."""
    by_path: dict[str, list[dict]] = {}
    broken: set[str] = set()
    for record in records:
        if record.get("error") or not all(f.is_file() for f in outputs.record_files(record, out)):
            broken.add(record["path"])
        else:
            by_path.setdefault(record["path"], []).append(record)
    return {p: v for p, v in by_path.items() if p not in broken}


Item = tuple[str, str]  # (image path or URI, output stem)
Decoded = tuple[str, Prepared | str]  # an image and its model-size copy, or the message of why it could not be read
Reader = Callable[[str, Options], np.ndarray]


def read_local(path: str, options: Options) -> np.ndarray:
    return read_rgb(path, options.max_pixels, options.max_bytes)


def _predictions(result: Explanation) -> list[dict]:
    return [{"class": p.index, "label": p.label, "probability": round(p.probability, 6)} for p in result.predictions]


def _text(result: Explanation) -> dict[str, object]:
    """A recogniser's text and its confidence as PaddleOCR's (the mean over its characters); none for other tasks."""
    if result.text is None:
        return {}
    confidence = float(np.mean([p.probability for p in result.predictions])) if result.predictions else 0.0
    return {"text": result.text, "text_probability": round(confidence, 6)}


def _records(path: str, stem: str, result: Explanation, files: list[dict], sheets: list[str]) -> list[dict]:
    height, width = result.image_rgb.shape[:2]
    predictions = _predictions(result)
    extra = ({"sheets": sheets} if sheets else {}) | _text(result)
    return [
        {
            "path": path,
            "stem": stem,
            "size": [width, height],
            "predictions": predictions,
            "target": {
                "class": m.index,
                "label": m.label,
                "probability": round(m.probability, 6),
                "logit": round(m.logit, 6),
                "method": m.method,
                **({} if m.box is None else {"box": list(m.box), "rank": m.rank}),
                **({} if m.position is None else {"position": m.position}),
                **({} if m.mask is None else {"mask_pixels": int(m.mask.sum())}),
                **({} if m.explains is None else {"explains": m.explains}),
                **({} if m.similarity is None else {"similarity": round(m.similarity, 6)}),
                **({} if m.completeness is None else {"completeness": round(m.completeness, 6)}),
            },
            "stats": maps.stats(m.cam),
            "empty_map": m.empty,
            **_seen(m, width, height),
            **f,
            **extra,
            "error": None,
        }
        for m, f in zip(result.maps, files, strict=True)
    ]


def _seen(m: TargetMap, width: int, height: int) -> dict[str, list[int]]:
    """``seen``: the part of the photo (x0, y0, x1, y1, exclusive) that the model saw, where it is not all of it
    (a centre crop's margins: their map is empty)."""
    seen = None if m.placement is None else m.placement.seen
    return {} if seen is None or seen == (0, 0, width, height) else {"seen": list(seen)}


class Worker:
    """Decodes, explains and writes batches of images into ``options.out``; every failure stays with its image.

    The local pipeline runs its three steps in overlapping threads; a Ray actor calls it whole.
    ``inputs`` (real paths of the run's images) guards against an output overwriting an input;
    ``replace`` allows replacing files of the same run (``--resume``, a retried Ray task). ``request``: the
    options' request where the caller resolved it (:meth:`Options.request`). ``mirrors``: the output stems of
    the reference images that ``options.both`` explains against each batch's images (:attr:`Plan.mirrors`).
    """

    def __init__(self, explainer: Explainer, options: Options, read: Reader = read_local,
                 inputs: frozenset[str] = frozenset(), replace: bool = False,
                 request: Request | None = None, mirrors: dict[str, str] | None = None) -> None:  # fmt: skip
        self.explainer, self.options, self.read, self.inputs, self.replace = explainer, options, read, inputs, replace
        self.request = request or options.request(explainer)
        self.mirrors = mirrors or {}
        self._mirrored: list[Decoded] | None = None  # the reference images, decoded at the first batch

    def __call__(self, items: list[Item]) -> list[dict]:
        return self.save_all(self.explain_decoded(self.decode(items), dict(items)), dict(items))

    def decode(self, items: list[Item]) -> list[Decoded]:
        decoded: list[Decoded] = []
        for path, _ in items:
            try:
                decoded.append((path, self.explainer.prepare(self.read(path, self.options))))
            except Exception as exc:  # one unreadable file is that file's error record
                decoded.append((path, describe(exc, path)))
        return decoded

    def _explain(self, images: list[Prepared], request: Request | None = None) -> list[Explanation | str]:
        call = lambda batch: self.explainer.run(batch, request or self.request)  # noqa: E731
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

    def explain_decoded(self, decoded: list[Decoded], stems: dict[str, str]) -> list[tuple[str, Explanation | str]]:
        """ORT's part: each decoded image's explanation, or its error message (one call per batch); then, with
        mirrors, each reference image's against the batch's explained images (named by their ``stems``: one
        more call)."""
        good = [(p, image) for p, image in decoded if isinstance(image, Prepared)]
        try:
            explained = self._explain([image for _, image in good]) if good else []
        except Exception as exc:
            explained = [describe(exc)] * len(good)
        results = dict(zip([p for p, _ in good], explained, strict=True))
        found = [(path, results.get(path, image)) for path, image in decoded]
        return found + self._explain_mirrors([(p, r) for p, r in found if isinstance(r, Explanation)], stems)

    def _explain_mirrors(self, explained: list[tuple[str, Explanation]], stems: dict[str, str]) -> list[Decoded]:
        """``--both``: each reference image's likeness to each of ``explained`` (their embeddings are its
        references, their stems its targets' names), from one call."""
        if not self.mirrors or not explained:
            return []
        if self._mirrored is None:
            self._mirrored = self.decode([(p, s) for p, s in self.mirrors.items()])
        asked = replace(self.request, codes=tuple(range(len(explained))), prompts=0,
                        references=np.stack([r.embedding for _, r in explained]),
                        reference_names=tuple(stems[p] for p, _ in explained))  # fmt: skip
        good = [(p, image) for p, image in self._mirrored if isinstance(image, Prepared)]
        try:
            back = self._explain([image for _, image in good], asked) if good else []
        except Exception as exc:
            back = [describe(exc)] * len(good)
        results = dict(zip([p for p, _ in good], back, strict=True))
        return [(path, results.get(path, image)) for path, image in self._mirrored]

    def save_all(self, explained: list[tuple[str, Explanation | str]], stems: dict[str, str]) -> list[dict]:
        """The writer's part: files and records of a batch (errors become records)."""
        lines: list[dict] = []
        for path, found in explained:
            mirror = {"mirror": True} if path in self.mirrors and path not in stems else {}
            try:
                if isinstance(found, str):
                    raise OnnxcamError(found)
                lines += [{**r, **mirror} for r in self._save(path, {**self.mirrors, **stems}[path], found)]
            except Exception as exc:  # a file that cannot be written fails this image only
                lines.append({"path": path, "error": describe(exc, path), **mirror})
        return lines

    def _save(self, path: str, stem: str, result: Explanation) -> list[dict]:
        o = self.options
        if not result.maps:  # (a detector's or a recogniser's image only): no detection, no text is an answer
            height, width = result.image_rgb.shape[:2]
            found = {"detections": 0} if result.text is None else _text(result)  # (a text shorter than asked)
            return [{"path": path, "stem": stem, "size": [width, height], "predictions": _predictions(result),
                     "target": None, **found, "error": None}]  # fmt: skip
        names = [f"{outputs.map_name(stem, m.key, m.label, m.method)}.{o.picture}" for m in result.maps]
        clash = [n for n in names if os.path.realpath(o.out / n) in self.inputs]
        if clash:
            raise OnnxcamError(f"writing {o.out / clash[0]} would overwrite an input image; choose another --out")
        files, sheets = outputs.save_explanation(
            result, o.out, stem, alpha=o.alpha, panel=o.panel, sheets=o.sheets, picture=o.picture, replace=self.replace,
            colormap=o.colormap,
        )
        return _records(path, stem, result, files, sheets)


def _pipeline(worker: Worker, todo: list[Item], size: int) -> Iterator[tuple[list[Item], list[dict]]]:
    """(items, records) per batch, in order, with three stages overlapping: decoding (and resizing) batch i+1,
    ONNX Runtime on batch i (here), writing the files of batch i-1 (OpenCV and ORT release the GIL)."""
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        decoding: Future | None = reader.submit(worker.decode, chunks[0]) if chunks else None
        writing: Future | None = None
        for i in range(len(chunks) + 1):
            explained = None
            if i < len(chunks):
                decoded = decoding.result()
                decoding = reader.submit(worker.decode, chunks[i + 1]) if i + 1 < len(chunks) else None
                explained = worker.explain_decoded(decoded, dict(chunks[i]))
            if writing is not None:
                yield chunks[i - 1], writing.result()
            writing = writer.submit(worker.save_all, explained, dict(chunks[i])) if explained is not None else None


@dataclass
class Plan:
    """What is left to do in an output folder, after checking it against an earlier run."""

    todo: list[Item]
    summary: Summary
    mirrors: dict[str, str] = field(default_factory=dict)  # --both: reference images' output stems


def plan(explainer: Explainer, paths: list[str], options: Options) -> Plan:
    """Check ``out`` (hold :func:`outputs.owned`), keep an earlier run's complete records, name the rest."""
    out = options.out
    kept = outputs.start_run(out, options.settings(explainer.engine.path), options.resume, options.overwrite)
    done = complete_records(kept, out)
    outputs.write_text(out / outputs.RESULTS, "".join(json.dumps(r) + "\n" for rs in done.values() for r in rs))
    fixed = {p: rs[0]["stem"] for p, rs in done.items() if isinstance(rs[0].get("stem"), str)}
    mirrors = options.mirrors
    inputs = {os.path.realpath(p) for p in paths}
    if any(os.path.realpath(p) in inputs for p in mirrors):
        raise OnnxcamError("with --both, a --like image is explained against the images: give it as --like or as an "
                           "image, not both")  # fmt: skip
    stems = outputs.unique_stems(paths + mirrors, fixed)
    todo = [(p, stems[p]) for p in paths if p not in done]
    return Plan(todo, Summary(images=len(paths), skipped=len(paths) - len(todo)), {p: stems[p] for p in mirrors})


class Driver:
    """What the folder run, Ray and the audit share between taking their folder (:func:`outputs.owned`,
    :func:`outputs.start_run`) and leaving it: whole records appended as they come and counted, then the report
    (and a Ray run's table) of every complete record, and the summary."""

    def __init__(self, out: Path, summary: Summary, records: str = outputs.RESULTS) -> None:
        self.out, self.summary, self.records = out, summary, records
        self.start = time.perf_counter()
        self.log: TextIO = (out / records).open("a", encoding="utf-8")

    def append(self, lines: list[dict]) -> list[dict]:
        """Append one batch's records (one write: whole records) and count its images; returns them."""
        ours = [r for r in lines if not r.get("mirror")]  # (--both's reference images are not the run's images)
        failed = {r["path"] for r in ours if r.get("error")}
        self.summary.failed += len(failed)
        self.summary.explained += len({r["path"] for r in ours}) - len(failed)
        self.log.write("".join(json.dumps(r) + "\n" for r in lines))
        self.log.flush()
        return lines

    def end(self, warnings: Sequence[str] = (), parquet: str = "refresh", title: str = "onnxcam explain",
            table: Callable[[list[dict]], list[dict]] | None = None) -> dict:  # fmt: skip
        """Close the records, write ``index.html`` (``table``: rows made from the records, shown above the cards)
        and the parquet table (``write``: a Ray run's; ``refresh``: an earlier Ray run's, following the
        records); return the summary record."""
        self.log.close()
        self.summary.seconds = time.perf_counter() - self.start
        records = outputs.read_records(self.out / self.records, strict=False)
        notes = list(warnings)
        if parquet == "write":
            outputs.write_parquet(records, self.out / outputs.PARQUET)
        elif parquet == "refresh":
            removed = outputs.refresh_parquet(records, self.out)
            notes += [removed] if removed else []
        report = write_report(records, self.out, notes, title, table(records) if table else None)
        return {"summary": {**vars(self.summary), "report": str(report)}}


def run(
    explainer: Explainer, paths: list[Path], options: Options, progress: bool = False, warnings: list[str] = (),
    request: Request | None = None,
) -> Iterator[dict]:  # fmt: skip
    """Explain ``paths`` into ``options.out``; yields every record as it is written, then a summary.

    Bad images become error records and the run goes on. The folder is locked for the run;
    an earlier run there is refused unless ``resume`` (same settings: its complete images
    are skipped, their records kept) or ``overwrite`` (its files are deleted first). At the
    end, ``index.html`` shows every record, with ``warnings`` about the model on top. ``request``: the options'
    (:meth:`Options.request`) where the caller resolved it.
    """
    out = options.out
    request = request or options.request(explainer)  # a bad request fails before any work
    with outputs.owned(out):
        work = plan(explainer, [str(p) for p in paths], options)
        inputs = frozenset(os.path.realpath(p) for p in paths)
        worker = Worker(explainer, options, inputs=inputs, replace=options.resume, request=request,
                        mirrors=work.mirrors)  # fmt: skip
        driver = Driver(out, work.summary)
        with progress_bar(len(work.todo)) if progress else nullcontext(None) as advance:
            for items, lines in _pipeline(worker, work.todo, options.batch_size):
                yield from driver.append(lines)
                if advance:
                    advance(len(items))
        yield driver.end(warnings)
