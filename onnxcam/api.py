"""The Python API: load a model once, explain many images. The CLI is a thin shell over this.

>>> explainer = Explainer("models/efficientnet_lite0.onnx")
>>> result = explainer.explain("cat.jpg", top_k=2)
>>> result.maps[0].label, result.maps[0].cam.shape   # ('Egyptian cat', (300, 451))
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxcam import contract, maps, methods, pixels
from onnxcam.engine import Engine, Outputs, softmax
from onnxcam.errors import OnnxcamError
from onnxcam.geometry import STRETCH, Placement
from onnxcam.image import read_mask, read_rgb
from onnxcam.prompts import TextTower


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float
    logit: float


@dataclass(frozen=True)
class TargetMap:
    """The map of one CAM method for one class on one image."""

    index: int
    label: str
    probability: float
    logit: float
    weights: np.ndarray  # [C] Grad-CAM channel weights alpha (from the graph, whatever the method)
    cam_lowres: np.ndarray  # [h, w] the method's map, unnormalised, at the target layer's size
    size: tuple[int, int]  # the image's (height, width)
    method: str = "gradcam"
    placement: Placement | None = None  # where the image lies in the model's input; None: stretched over it
    box: tuple[float, float, float, float] | None = None  # a detection's x1, y1, x2, y2 in image pixels
    rank: int | None = None  # a detection's place among the kept ones, 1 = highest score
    position: int | None = None  # a recognised character's place in the text, 0 = the first
    mask: np.ndarray | None = None  # an instance segmenter's detection: its mask, bool [H, W] at the image's size
    explains: str | None = None  # what the map shows where that is not a class's evidence (a regressor's direction)
    similarity: float | None = None  # a similarity model's: the cosine of the image's embedding and the reference's
    attribution: np.ndarray | None = None  # a pixel method's: its float map [H, W] at the model's input, before
    # the ReLU (signed for gradient x input and Integrated Gradients), channels reduced as the method says
    completeness: float | None = None  # Integrated Gradients': |sum(attr) - (f(x) - f(baseline))| / |f(x) - f(b..)|
    percentile: float | None = None  # the map clipped at this percentile of its values before scaling

    @cached_property
    def _finished(self) -> tuple[np.ndarray, bool]:
        # computed when first read: a folder run reads it in its writer thread, not in ORT's
        return maps.finish(self.cam_lowres, self.size, self.placement, self.percentile)

    @property
    def cam(self) -> np.ndarray:
        """[H, W] float32 in [0, 1], the image's size."""
        return self._finished[0]

    @property
    def empty(self) -> bool:
        """True when no location supports the class (the map is all zero)."""
        return self._finished[1]

    @cached_property
    def signed(self) -> np.ndarray | None:
        """A signed pixel method's float map (gradient x input, Integrated Gradients) at the image's size, both
        signs kept (None for the others)."""
        if self.attribution is None or not methods.METHODS[self.method].signed:
            return None
        if self.placement is None:
            return maps.upsample(self.attribution, self.size)
        return self.placement.map_to_photo(maps.upsample(self.attribution, self.placement.input))

    @property
    def peak(self) -> tuple[int, int]:
        """(x, y) of the map's maximum in image pixels."""
        return maps.peak(self.cam)

    @property
    def key(self) -> str:
        """What names its files: the class index, and a detection's rank (two boxes may share a class)."""
        if self.position is not None:  # (a text may hold a character twice)
            return f"char{self.position}-{self.index}"
        return str(self.index) if self.rank is None else f"box{self.rank}-{self.index}"


@dataclass(frozen=True)
class Explanation:
    image_rgb: np.ndarray
    predictions: list[Prediction]  # a recogniser's: its characters in reading order
    maps: list[TargetMap]
    text: str | None = None  # a recogniser's decoded text (its characters' labels joined)
    embedding: np.ndarray | None = None  # a similarity model's: the image's embedding [D], L2-normalised


@dataclass(frozen=True)
class Prepared:
    """A photo (uint8 RGB), the model's input made from it by the card's resize convention, and where the
    photo lies in that input: :meth:`Explainer.prepare`."""

    photo: np.ndarray
    model_input: np.ndarray
    placement: Placement

    @classmethod
    def as_input(cls, image: np.ndarray) -> Prepared:
        """An image that already is the model's input (its maps stay at the input's size and frame)."""
        return cls(image, image, STRETCH.place(image.shape[:2], image.shape[:2]))


@dataclass(frozen=True)
class Request:
    """An explain request resolved against one model (:meth:`Explainer.request`), checked once: its method names,
    its target rows (class indices, ``-k`` for the k-th best or a detector's k-th detection) and the task's
    options. :meth:`Explainer.explain_batch`, the folder run, Ray's actors and the audit run one as it is."""

    codes: tuple[int, ...]
    methods: tuple[str, ...] = ("gradcam",)
    predictions: int = 5
    eigen_smooth: bool = False
    aug_smooth: bool = False
    conf: float | None = None
    iou: float | None = None
    mask: np.ndarray | str | Path | None = None  # a segmenter's region (an image file, or [H, W] non-zero inside)
    references: np.ndarray | None = None  # a similarity model's: the [R, D] embeddings each image is compared with
    reference_names: tuple[str, ...] = ()  # and what each is (a file's name, a prompt)
    prompts: int = 0  # how many of the references (the last ones) are text prompts' embeddings
    # the many-input pixel methods' steps, baseline, samples
    attribution: pixels.Settings = field(default_factory=pixels.Settings)
    percentile: float | None = None  # clip each map at this percentile (None: the pixel methods' 99, else none)


@dataclass(frozen=True)
class Found:
    """One method's maps of one image ``[T, h, w]`` (>= 0, unnormalised) and, for a pixel method, its float maps
    at the input before the ReLU and Integrated Gradients' completeness errors ``[T]``."""

    lowres: np.ndarray
    attribution: np.ndarray | None = None
    completeness: np.ndarray | None = None

    def target(self, t: int, percentile: float | None) -> dict[str, Any]:
        """Target ``t``'s fields of a :class:`TargetMap`."""
        at = self.attribution
        return {"cam_lowres": self.lowres[t], "attribution": None if at is None else at[t].astype(np.float32),
                "completeness": None if self.completeness is None else float(self.completeness[t]),
                "percentile": percentile if percentile is not None or at is None else methods.PIXEL_PERCENTILE}


REGRESSION_SIGN = "where the evidence raises this output's value (what lowers it is not shown)"
LIKENESS = "where the evidence raises the image's cosine similarity to this reference"
AUG_GAINS = (0.9, 1.0, 1.1)  # brightness factors of the test-time augmentation, as ttach's Multiply
DETECTIONS = 10  # kept detections explained by default
MAX_DETECTIONS = 300  # ultralytics' max_det


class Explainer:
    """Grad-CAM with one ONNX Runtime call per batch of images, for all their targets at once."""

    def __init__(
        self, model: str | Path, provider: str | None = None, session_options: ort.SessionOptions | None = None
    ) -> None:
        """``session_options``: ONNX Runtime's, for the one session (threads, logging)."""
        self.engine = Engine(model, provider, session_options)
        self.card = self.engine.card
        self._by_name = {name.lower(): i for i, name in enumerate(self.card.labels)}
        self.resizing = self.card.resizing

    @property
    def labels(self) -> tuple[str, ...]:
        return self.card.labels

    def class_index(self, target: int | str) -> int:
        """A class index from an index or a class name (case-insensitive); bad ones raise OnnxcamError."""
        count = len(self.labels)
        text = str(target).strip()
        if re.fullmatch(r"-?\d+", text):
            index = int(text)
            if not 0 <= index < count:
                raise OnnxcamError(
                    f"class index {index} is out of range; this model has {count} classes (0-{count - 1})"
                )
            return index
        if text.lower() in self._by_name:
            return self._by_name[text.lower()]
        close = self._suggestions(text.lower())
        hint = f"; did you mean {', '.join(repr(self.labels[self._by_name[c]]) for c in close)}?" if close else ""
        raise OnnxcamError(f"unknown class name {text!r}{hint} (see `onnxcam info MODEL --labels`)")

    def _suggestions(self, text: str, count: int = 3) -> list[str]:
        """Class names (lower case) for a name that is none: those holding it as a word (``cat``: Egyptian cat, tiger
        cat, Persian cat), then as a part of one, then the closest spellings."""
        words = [n for n in self._by_name if text in re.split(r"[^a-z0-9]+", n)]
        parts = [n for n in self._by_name if text in n and n not in words]
        close = difflib.get_close_matches(text, self._by_name, n=count, cutoff=0.6)
        return list(dict.fromkeys([*words, *parts, *close]))[:count]

    def target_codes(self, targets: Sequence[int | str] = (), top_k: int | None = None) -> list[int]:
        """Contract codes: explicit class indices, then ``-1 .. -top_k`` for the top predictions.

        With neither given, the top-1 prediction is explained; on a detector, ``-1 .. -top_k`` are its
        kept detections, the first 10 by default.
        """
        if self.card.task == "detection":
            return self._detection_codes(targets, top_k)
        if self.card.task == "recognition":
            return self._character_codes(targets, top_k)
        if self.card.task == "regression":
            return self._coordinate_codes(targets, top_k)
        codes = [self.class_index(t) for t in targets]
        k = top_k if top_k is not None else (0 if codes else 1)
        if not 0 <= k <= len(self.labels):
            raise OnnxcamError(f"top-k must be from 1 to {len(self.labels)} (0 only beside --target), got {k}")
        codes += [-(i + 1) for i in range(k)]
        if not codes:
            raise OnnxcamError("nothing to explain: give a --target or a --top-k of at least 1")
        return codes

    def _detection_codes(self, targets: Sequence[int | str], top_k: int | None) -> list[int]:
        if targets:
            raise OnnxcamError("a detector explains its kept detections: give --top-k (how many), --conf and --iou, "
                               "not --target")  # fmt: skip
        k = DETECTIONS if top_k is None else top_k
        if not 1 <= k <= MAX_DETECTIONS:
            raise OnnxcamError(f"top-k (detections to explain) must be between 1 and {MAX_DETECTIONS}, got {k}")
        return [-(i + 1) for i in range(k)]

    def _coordinate_codes(self, targets: Sequence[int | str], top_k: int | None) -> list[int]:
        """A regressor's target rows: output coordinates (indices or names), every one by default."""
        if top_k is not None:
            raise OnnxcamError("a regressor's outputs have no ranking: give --target (an output's index or name; "
                               "default: every output), not --top-k")  # fmt: skip
        return [self.class_index(t) for t in targets] or list(range(len(self.labels)))

    def _character_codes(self, targets: Sequence[int | str], top_k: int | None) -> list[int]:
        """A recogniser's target rows: character positions (0 = the first), every one by default, or the first k."""
        positions = self.engine.positions
        codes = []
        for t in targets:
            text = str(t).strip()
            if not re.fullmatch(r"\d+", text) or int(text) >= positions:
                raise OnnxcamError(f"a recogniser's --target is a character position from 0 to {positions - 1} (its "
                                   f"steps: at most {positions} characters), got {text!r}")  # fmt: skip
            codes.append(int(text))
        if top_k is not None and not 1 <= top_k <= positions:
            raise OnnxcamError(f"top-k (the first characters to explain) must be from 1 to {positions}, got {top_k}")
        k = top_k if top_k is not None else (0 if codes else positions)
        return list(dict.fromkeys([*codes, *range(k)]))

    def explain(
        self,
        image: np.ndarray | str | Path,
        targets: Sequence[int | str] = (),
        top_k: int | None = None,
        **options: Any,
    ) -> Explanation:
        """Explain one image (a path, or a uint8 ``[H, W, 3]`` RGB array of any size).

        ``options``: ``predictions``, ``method``, ``eigen_smooth``, ``aug_smooth``, ... as :meth:`request` takes them.
        """
        return self.explain_batch([image], targets, top_k, **options)[0]

    def prepare(self, image: np.ndarray | str | Path) -> Prepared:
        """``image`` (a path, or a uint8 ``[H, W, 3]`` RGB array) read and made the model's input as the card's
        resize convention says (stretch, letterbox, centre crop, padding), the first step of :meth:`explain_batch`:
        a folder run does it in its reader thread while ORT runs."""
        photo = read_rgb(image) if isinstance(image, str | Path) else _check_rgb(image)
        return Prepared(photo, *self.resizing.apply(photo, self.card.input_size))

    def explain_batch(
        self,
        images: Sequence[np.ndarray | str | Path | Prepared],
        targets: Sequence[int | str] = (),
        top_k: int | None = None,
        **options: Any,
    ) -> list[Explanation]:
        """Explain several images in one ORT call; each gets the same target list. ``options``: ``predictions``,
        ``method``, ``eigen_smooth``, ``aug_smooth``, ``conf``, ``iou``, ``mask`` as :meth:`request` takes them
        (a loop over batches asks once, then calls :meth:`run`)."""
        return self.run(images, self.request(targets, top_k, **options))

    def request(
        self,
        targets: Sequence[int | str] = (),
        top_k: int | None = None,
        predictions: int = 5,
        method: str | Sequence[str] | None = None,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
        conf: float | None = None,
        iou: float | None = None,
        mask: np.ndarray | str | Path | None = None,
        like: Sequence[np.ndarray | str | Path] = (),
        prompts: Sequence[str] = (),
        attribution: pixels.Settings | None = None,
        percentile: float | None = None,
    ) -> Request:
        """What to explain, checked against this model: a bad method name, class, top-k or an option the model's
        task has no use for is an OnnxcamError here, before any image is read.

        ``method`` is one name from :data:`onnxcam.methods.METHODS` (any case) or several. The methods that need only
        activations and gradients all come from the same call; ``scorecam`` and ``ablationcam``
        add batched passes through the same session. ``maps`` holds, per method in the given
        order, one map per target. ``aug_smooth`` averages the [0, 1]-scaled maps of six views
        (horizontal flip x brightness 0.9 / 1.0 / 1.1), each mapped back to the original frame,
        for the classes resolved on the original view. On a detector, ``maps`` holds one map per kept
        detection (with its box), and ``conf``, ``iou`` are its suppression thresholds. On a segmenter, ``mask``
        (an image file, or an ``[H, W]`` array, non-zero inside; the size of every image) is the region whose
        pixels each class's score sums, instead of the pixels predicted as the class. On a similarity model,
        ``like`` gives the references (images, RGB arrays, or ``.npy`` files of ``[R, D]`` embeddings): one map per
        reference, of the image's cosine similarity to it. On an image-text model (CLIP), ``prompts`` are texts
        whose embeddings (its text tower's) are references too: each map explains the model's logit for the
        prompt, ``logit_scale`` times the cosine, or its softmax over the references (the card's ``score``).
        ``attribution``: how Integrated Gradients and SmoothGrad run (its ``baseline`` may be an image file, read
        and resized as a photo); ``percentile``: clip each map at that percentile before scaling it (default: 99 for
        the pixel methods, none for the others).
        """
        names = methods.resolve(method, self.engine.outputs, self.card.task, self.card.has_gradients)
        self.check_task(aug_smooth, conf, iou, mask is not None)
        self._check_scales(names)
        settings = self._attribution(attribution or pixels.Settings(), names)
        if percentile is not None and not 0 < percentile <= 100:
            raise OnnxcamError(f"--percentile must be in (0, 100], got {percentile}")
        shared = {"attribution": settings, "percentile": percentile}
        if self.card.task == "similarity" or like or prompts:
            references, labels = self._references(like, prompts, targets, top_k)
            codes = tuple(range(len(references)))
            return Request(codes, tuple(names), predictions, eigen_smooth, aug_smooth, conf, iou, mask, references,
                           labels, len(prompts), **shared)  # fmt: skip
        codes = self.target_codes(targets, top_k)
        return Request(tuple(codes), tuple(names), predictions, eigen_smooth, aug_smooth, conf, iou, mask, **shared)

    def _attribution(self, settings: pixels.Settings, names: list[str]) -> pixels.Settings:
        """``settings`` checked (a setting that none of the methods ``names`` reads is refused, not ignored); a
        baseline image (a file or an RGB array) made the model's input as a photo is."""
        default, read = pixels.Settings(), {f for n in names for f in methods.METHODS[n].settings}
        for name in (f.name for f in dataclasses.fields(settings)):
            value = getattr(settings, name)
            changed = not isinstance(value, str | int | float) or value != getattr(default, name)
            if changed and name not in read:
                readers = ", ".join(n for n, m in methods.METHODS.items() if name in m.settings)
                raise OnnxcamError(f"--{name} applies to {readers}; the methods asked ({', '.join(names)}) do "
                                   "not read it: leave it out or add one of them to --method")  # fmt: skip
        given = settings.baseline
        if not isinstance(given, str) or given not in pixels.BASELINES:
            settings = dataclasses.replace(settings, baseline=self.prepare(given).model_input)
        problem = settings.problem()
        if problem is not None:
            raise OnnxcamError(problem)
        return settings

    def _references(self, like: Sequence[np.ndarray | str | Path], prompts: Sequence[str],
                    targets: Sequence[int | str], top_k: int | None) -> tuple[np.ndarray, tuple[str, ...]]:  # fmt: skip
        """A similarity model's references ``[R, D]`` and their names: ``.npy`` embeddings as they are, images
        (paths or RGB arrays) embedded by this model, then text prompts embedded by its text tower."""
        if self.card.task != "similarity":
            given = "--prompt explains an image-text model's prompts" if prompts else "--like compares embeddings"
            raise OnnxcamError(f"{given}; this is a {self.card.task} model")
        if prompts and not self.card.text:
            raise OnnxcamError(f"--prompt needs an image-text model's text tower, which {self.engine.path.name} "
                               "has not: export the CLIP model with it (export --from ... --text ...)")  # fmt: skip
        if not like and not prompts:
            ask = "--prompt TEXT (or --like IMAGE)" if self.card.text else "--like IMAGE (or a .npy of embeddings)"
            raise OnnxcamError(f"a similarity model explains a likeness: give {ask}, one or more")
        repeated = [p for p in dict.fromkeys(prompts) if list(prompts).count(p) > 1]
        if repeated:
            raise OnnxcamError(f"the prompt {repeated[0]!r} is given twice; give each prompt once")
        if targets or top_k is not None:
            raise OnnxcamError("a similarity model's targets are its --like references: leave out --target and --top-k")
        rows, names = [], []
        for i, item in enumerate(like):
            if isinstance(item, str | Path) and Path(item).suffix.lower() == ".npy":
                found, stem = _embeddings_file(Path(item)), Path(item).stem
                rows.append(found)
                names += [stem] if len(found) == 1 else [f"{stem}[{r}]" for r in range(len(found))]
            else:
                rows.append(self.embed([item]))
                names.append(Path(item).stem if isinstance(item, str | Path) else f"reference {i}")
        if prompts:
            rows.append(self.text_tower.embed(prompts))
            names += list(prompts)
        references = np.concatenate(rows)
        self.engine._similarity_feeds(references)  # (the embedding's size checked before any image is read)
        return references, tuple(names)

    @cached_property
    def text_tower(self) -> TextTower:
        """An image-text model's text tower (beside its file), loaded at its first prompt; it caches each prompt's
        embedding."""
        return TextTower(Path(self.engine.path).parent, self.card.text, self.engine.session.get_providers())

    def embed(self, images: Sequence[np.ndarray | str | Path]) -> np.ndarray:
        """A similarity model's embeddings ``[M, D]`` (L2-normalised) of ``images`` (paths or RGB arrays), prepared
        as any image is."""
        batch = np.stack([self.prepare(im).model_input for im in images])
        return self.engine.run(batch, np.zeros((len(images), 1), np.int64)).embeddings

    def run(self, images: Sequence[np.ndarray | str | Path | Prepared], asked: Request) -> list[Explanation]:
        """Explain ``images`` as ``asked`` (a :meth:`request` of this model), in one ORT call."""
        codes, names, eigen_smooth = list(asked.codes), list(asked.methods), asked.eigen_smooth
        prepared = [im if isinstance(im, Prepared) else self.prepare(im) for im in images]
        photos = [p.photo for p in prepared]
        batch = np.stack([p.model_input for p in prepared])
        full, attention = methods.needs_gradients(names), methods.attention_outputs(names)
        if self.card.task == "detection":
            thresholds = _thresholds(asked.conf, asked.iou)
            return self._explain_detections(prepared, batch, asked, thresholds)
        if self.card.task == "recognition":
            return self._explain_text(prepared, batch, asked)
        if self.card.task == "similarity":
            return self._explain_likeness(prepared, batch, asked)
        region = None if asked.mask is None else self._region(asked.mask, prepared)
        targets = np.tile(np.asarray(codes, dtype=np.int64), (len(photos), 1))
        out = self.engine.run(batch, targets, full, attention, region=region, **methods.pixel_flags(names))
        # a segmenter's masked sums have no softmax meaning: its "probability" is each class's share of the pixels;
        # a regressor's is its value, its predictions every output in order
        segmenter, regressor = self.card.task == "segmentation", self.card.task == "regression"
        probs = (out.pixel_shares.astype(np.float64) if segmenter else out.logits.astype(np.float64) if regressor
                 else softmax(out.logits.astype(np.float64)))  # fmt: skip
        explains = REGRESSION_SIGN if regressor else None
        results = []
        for n, (photo, placed) in enumerate(zip(photos, prepared, strict=True)):
            ranking = np.arange(probs.shape[1]) if regressor else np.argsort(-(probs if segmenter else out.logits)[n],
                                                                               kind="stable")  # fmt: skip
            order = ranking[: asked.predictions]
            preds = [self._prediction(int(i), probs[n], out.logits[n]) for i in order]
            found = []
            for name in names:
                if asked.aug_smooth:
                    made = self._augmented_maps(name, batch[n], out.target_classes[n], full, eigen_smooth, attention,
                                                asked.attribution)  # fmt: skip
                else:
                    made = self._maps(name, batch[n], out, n, eigen_smooth, asked.attribution)
                for t, index in enumerate(out.target_classes[n]):
                    pred = self._prediction(int(index), probs[n], out.logits[n])
                    found.append(TargetMap(**vars(pred), weights=out.weights[n, t], **made.target(t, asked.percentile),
                                           size=photo.shape[:2], method=name, placement=placed.placement,
                                           explains=explains))  # fmt: skip
            results.append(Explanation(photo, preds, found))
        return results

    def check_task(self, aug_smooth: bool, conf: float | None, iou: float | None, mask: bool = False) -> None:
        """Refuse the options this model's task has no use for, naming them."""
        task = self.card.task
        if mask and task != "segmentation":
            raise OnnxcamError(f"--mask gives a segmenter the region to explain; this is a {task} model")
        if mask and aug_smooth:
            raise OnnxcamError("--aug-smooth flips the image but not the --mask: give one of them")
        if task != "detection" and (conf is not None or iou is not None):
            raise OnnxcamError(f"--conf and --iou apply to detectors; this is a {task} model")
        if task == "detection" and iou is not None and contract.IOU_THRESHOLD not in self.engine.inputs:
            raise OnnxcamError("--iou applies to detectors that suppress overlapping boxes; this one predicts a set "
                               "(DETR): its k-th detection is its k-th query by score")  # fmt: skip
        if task == "detection" and aug_smooth:
            raise OnnxcamError("--aug-smooth flips the image, which moves a detector's boxes; leave it out")
        if task == "regression" and aug_smooth:
            raise OnnxcamError("--aug-smooth flips the image, which changes what a regressor's outputs may mean (a "
                               "landmark's x); leave it out")  # fmt: skip
        if task == "recognition" and aug_smooth:
            raise OnnxcamError("--aug-smooth flips the image, which reverses a line of text; leave it out")

    def _region(self, mask: np.ndarray | str | Path, prepared: list[Prepared]) -> np.ndarray:
        """``[N, H, W]`` float32 pixel weights at the model's size: ``mask`` (non-zero inside) placed as each photo."""
        first = prepared[0].photo.shape[:2]
        inside = read_mask(mask, first) if isinstance(mask, str | Path) else np.asarray(mask) != 0
        inside = inside.any(axis=2) if inside.ndim == 3 else inside  # (a colour picture of the region)
        for photo in (p.photo for p in prepared):
            if inside.shape != photo.shape[:2]:
                raise OnnxcamError(f"the mask is {inside.shape[1]}x{inside.shape[0]} pixels but the image is "
                                   f"{photo.shape[1]}x{photo.shape[0]}; give a mask the size of the image")  # fmt: skip
        return np.stack([p.placement.region_to_input(inside.astype(np.float32)) for p in prepared])

    def _check_scales(self, names: list[str]) -> None:
        """A model with several target layers runs the methods that read activations and gradients only (and
        those that read none: the many-input pixel methods)."""
        other = [n for n, m in ((n, methods.METHODS[n]) for n in names)
                 if (m.extra_passes and m.attribute is None) or m.attention]  # fmt: skip
        if self.card.extra_layers and other:
            raise OnnxcamError(f"{', '.join(other)} cannot combine several target layers; this model has "
                               f"{1 + len(self.card.extra_layers)}: use a gradient method or eigencam")  # fmt: skip

    def require_classifier(self, command: str) -> None:
        """Refuse a command that reads class probabilities on a segmenter's or detector's model."""
        if self.card.task != "classification":
            raise OnnxcamError(f"onnxcam {command} measures a classifier's maps by its class probabilities; this is a "
                               f"{self.card.task} model: use onnxcam explain")  # fmt: skip

    def _explain_detections(
        self, prepared: list[Prepared], batch: np.ndarray, asked: Request, thresholds: dict[str, float]
    ) -> list[Explanation]:
        """One map per kept detection of each photo, from one ORT call; boxes mapped back to the photo's pixels
        (the padding taken off, clipped to the photo, as ultralytics' ``scale_boxes``)."""
        codes, names, eigen_smooth = list(asked.codes), list(asked.methods), asked.eigen_smooth
        full = methods.needs_gradients(names)
        out = self.engine.run(batch, np.tile(np.asarray(codes, dtype=np.int64), (len(prepared), 1)), full,
                              thresholds=thresholds, **methods.pixel_flags(names))  # fmt: skip
        results = []
        for n, p in enumerate(prepared):
            kept = np.flatnonzero(out.box_anchors[n] >= 0)
            boxes = p.placement.boxes_to_photo(out.boxes[n])
            masks = {t: instance_mask(out.instance_masks[n, t], out.boxes[n, t], p.placement) for t in kept
                     } if out.instance_masks is not None else {}  # fmt: skip
            found = []
            for name in names:
                made = self._maps(name, batch[n], out, n, eigen_smooth, asked.attribution)
                for t in kept:
                    box = tuple(float(v) for v in np.round(boxes[t], 2))
                    found.append(TargetMap(**vars(self._detection(out, n, t)), weights=out.weights[n, t],
                                           **made.target(t, asked.percentile), size=p.photo.shape[:2], method=name,
                                           box=box, rank=int(t) + 1, placement=p.placement,
                                           mask=masks.get(t)))  # fmt: skip
            results.append(Explanation(p.photo, [self._detection(out, n, t) for t in kept], found))
        return results

    def _explain_text(self, prepared: list[Prepared], batch: np.ndarray, asked: Request) -> list[Explanation]:
        """A recogniser's decoded text and one map per asked character that it holds, from one ORT call."""
        codes, names, eigen_smooth = list(asked.codes), list(asked.methods), asked.eigen_smooth
        out = self.engine.run(batch, np.tile(np.asarray(codes, dtype=np.int64), (len(prepared), 1)),
                              methods.needs_gradients(names), **methods.pixel_flags(names))  # fmt: skip
        results = []
        for n, p in enumerate(prepared):
            length = int((out.characters[n] >= 0).sum())
            characters = [self._character(out, n, j) for j in range(length)]
            found = []
            for name in names:
                made = self._maps(name, batch[n], out, n, eigen_smooth, asked.attribution)
                for t, j in enumerate(codes):
                    if j < length:
                        found.append(TargetMap(**vars(characters[j]), weights=out.weights[n, t],
                                               **made.target(t, asked.percentile), size=p.photo.shape[:2],
                                               method=name, position=j,
                                               placement=p.placement))  # fmt: skip
            results.append(Explanation(p.photo, characters, found, "".join(c.label for c in characters)))
        return results

    def _explain_likeness(self, prepared: list[Prepared], batch: np.ndarray, asked: Request) -> list[Explanation]:
        """A similarity model's cosine similarity of each image to each reference, and one map per reference, from
        one ORT call."""
        codes = np.asarray(asked.codes, dtype=np.int64)
        names = list(asked.methods)
        out = self.engine.run(batch, np.tile(codes, (len(prepared), 1)), methods.needs_gradients(names),
                              references=asked.references, **methods.pixel_flags(names))  # fmt: skip
        scale, first_prompt = self.card.logit_scale, len(codes) - asked.prompts
        results = []
        for n, p in enumerate(prepared):
            logits = out.logits[n].astype(np.float64)  # an image-text model's: logit_scale * cosine
            shares = softmax(logits[None])[0] if scale else logits  # (the softmax over the references)
            likes = [Prediction(int(r), asked.reference_names[r], float(shares[r]), float(logits[r])) for r in codes]
            found = []
            for name in asked.methods:
                made = self._maps(name, batch[n], out, n, asked.eigen_smooth, asked.attribution, asked.references)
                found += [TargetMap(**vars(likes[t]), weights=out.weights[n, t], **made.target(t, asked.percentile),
                                    size=p.photo.shape[:2], method=name, placement=p.placement,
                                    explains=None if t >= first_prompt else LIKENESS,
                                    similarity=float(logits[t] / (scale or 1.0)))
                          for t in range(len(codes))]  # fmt: skip
            results.append(Explanation(p.photo, likes, found, embedding=out.embeddings[n]))
        return results

    def _character(self, out: Outputs, n: int, j: int) -> Prediction:
        """Character ``j`` of image ``n``: its symbol, its probability at its first step and its explained score."""
        index = int(out.characters[n, j])
        return Prediction(index, self.labels[index], float(out.character_probabilities[n, j]), float(out.logits[n, j]))

    def _detection(self, out: Outputs, n: int, t: int) -> Prediction:
        """Row ``t`` of image ``n`` as a prediction: its class and its box's score (as probability and logit)."""
        index, score = int(out.target_classes[n, t]), float(out.box_scores[n, t])
        return Prediction(index, self.labels[index], score, score)

    def _maps(self, name: str, image: np.ndarray, out: Outputs, n: int, eigen_smooth: bool,
              settings: pixels.Settings, references: np.ndarray | None = None) -> Found:  # fmt: skip
        """Method ``name``'s maps of image ``n`` of a run (``settings``: the many-input pixel methods'; ``references``:
        a similarity model's, which they feed their rows)."""
        activations, classes, weights = out.activations[n], out.target_classes[n], out.weights[n]
        m = methods.METHODS[name]
        if m.attribute is not None:  # (a detector's rows are its boxes: class * A + anchor, fixed along the path)
            codes = classes if out.box_anchors is None else classes * out.logits.shape[-1] + np.maximum(
                out.box_anchors[n], 0)  # fmt: skip
            found = m.attribute(self.engine, image, codes, settings, references)
            signed = m.pixel(out.pixels[n].astype(np.float64) if out.pixels is not None else None, found.values)
            return Found(np.maximum(signed, 0), signed, found.completeness)
        if m.spatial is not None:
            return Found(m.spatial(self.engine, image, activations, classes))
        if m.passes is not None:
            weights = m.passes(self.engine, image, activations, classes)
        if m.pixel is not None:
            inputs = [None if a is None else a[n] for a in (out.pixels, out.pixel_gradients, out.guided_gradients)]
            signed = methods.at_input(name, activations, weights, *inputs)
            return Found(np.maximum(signed, 0), signed)
        attentions = [None if a is None else a[n] for a in (out.attentions, out.attention_gradients)]
        first = methods.cam(name, activations, out.gradients[n], weights, eigen_smooth, *attentions)
        if not out.scales:
            return Found(first)
        more = [methods.cam(name, a[n], g[n], w[n], eigen_smooth) for a, w, g in out.scales]
        return Found(maps.aggregate([first, *more]))

    def _augmented_maps(
        self, name: str, image: np.ndarray, classes: np.ndarray, full: bool, eigen_smooth: bool, attention: tuple,
        settings: pixels.Settings,
    ) -> Found:  # fmt: skip
        views = [(flip, gain) for flip in (False, True) for gain in AUG_GAINS]
        batch = np.stack([np.clip(np.rint((image[:, ::-1] if f else image) * g), 0, 255).astype(np.uint8)
                          for f, g in views])  # fmt: skip
        out = self.engine.run(batch, np.tile(classes, (len(views), 1)), full, attention,
                              **methods.pixel_flags([name]))  # fmt: skip
        total = 0.0
        for v, (flip, _) in enumerate(views):
            lowres = self._maps(name, batch[v], out, v, eigen_smooth, settings).lowres
            lowres = lowres[:, :, ::-1] if flip else lowres
            total = total + np.stack([maps.normalize(m)[0] for m in lowres])
        return Found(total / len(views))

    def _prediction(self, index: int, probs: np.ndarray, logits: np.ndarray) -> Prediction:
        return Prediction(index, self.labels[index], float(probs[index]), float(logits[index]))


def instance_mask(logits: np.ndarray, box: np.ndarray, placement: Placement) -> np.ndarray:
    """A detection's mask, bool at the photo's size, from its ``instance_masks`` logits ``[h, w]`` and its box (x1,
    y1, x2, y2 in input pixels), as ultralytics' ``process_mask(..., upsample=True)``: upsampled bilinearly to the
    model's input, above 0, inside the box (the columns and rows whose index is in [x1, x2), [y1, y2)); then
    placed in the photo as a map is (the padding cut away)."""
    height, width = placement.input
    mask = maps.upsample(logits, placement.input) > 0
    x1, y1, x2, y2 = box
    columns, rows = np.arange(width), np.arange(height)[:, None]
    mask &= (columns >= x1) & (columns < x2) & (rows >= y1) & (rows < y2)
    return placement.map_to_photo(mask.astype(np.float32)) > 0.5


def _embeddings_file(path: Path) -> np.ndarray:
    """``[R, D]`` reference embeddings from a ``.npy`` file (a single ``[D]`` one as one row); no pickles."""
    try:
        found = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise OnnxcamError(f"cannot read {path} as a .npy of embeddings: {str(exc).splitlines()[0][:120]}") from None
    found = found[None] if found.ndim == 1 else found
    if found.ndim != 2 or not np.issubdtype(found.dtype, np.number) or not np.isfinite(found).all():
        raise OnnxcamError(f"{path} must hold finite embeddings [R, D] or [D], got {found.dtype} {list(found.shape)}")
    return found.astype(np.float32)


def _thresholds(conf: float | None, iou: float | None) -> dict[str, float]:
    given = {contract.CONF_THRESHOLD: conf, contract.IOU_THRESHOLD: iou}
    return {name: value for name, value in given.items() if value is not None}


def _check_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise OnnxcamError(f"an image array must be uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
    return image
