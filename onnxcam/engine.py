"""One ONNX Runtime session over an onnxcam model: the graph's outputs for a batch and its targets."""

from __future__ import annotations

import importlib.util
import io
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnxruntime as ort

from onnxcam import contract
from onnxcam.contract import ModelCard
from onnxcam.errors import OnnxcamError

ATTENTION_FLAGS = {  # the optional outputs of vision transformers and the inputs that switch them on
    contract.ATTENTIONS: contract.WITH_ATTENTIONS,
    contract.ATTENTION_GRADIENTS: contract.WITH_ATTENTION_GRADIENTS,
}


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis`` (logits -> probabilities)."""
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


@dataclass(frozen=True)
class Outputs:
    """One run's outputs; shapes as in :mod:`onnxcam.contract`."""

    logits: np.ndarray
    activations: np.ndarray
    weights: np.ndarray
    gradients: np.ndarray
    target_classes: np.ndarray
    attentions: np.ndarray | None = None  # [N, L, H, T, T] when asked for (vision transformers)
    attention_gradients: np.ndarray | None = None  # [N, T, L, H, T, T] when asked for
    saliency: np.ndarray | None = None  # [N, T, H, W] float32 in [0, 1] when asked for
    boxes: np.ndarray | None = None  # detectors: [N, T, 4] x1, y1, x2, y2 in input pixels
    box_scores: np.ndarray | None = None  # detectors: [N, T]
    box_anchors: np.ndarray | None = None  # detectors: [N, T], -1 where a -k row found no k-th detection
    pixel_shares: np.ndarray | None = None  # segmenters: [N, K], the share of the pixels predicted as each class
    instance_masks: np.ndarray | None = None  # instance segmenters: [N, T, h, w] mask logits (the mask: above 0)
    embeddings: np.ndarray | None = None  # similarity models: [N, D], each image's embedding, L2-normalised
    characters: np.ndarray | None = None  # recognisers: [N, L] int64, each position's symbol, -1 beyond the text
    character_probabilities: np.ndarray | None = None  # recognisers: [N, L], at each character's first step
    pixels: np.ndarray | None = None  # a file with its backward to the input: the model's float input [N, C, H, W]
    pixel_gradients: np.ndarray | None = None  # and the gradient there [N, T, C, H, W] (when asked for)
    guided_gradients: np.ndarray | None = None  # and Guided Backpropagation's there [N, T, C, H, W] (when asked for)
    scales: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...] = ()  # (activations, weights, gradients) of
    # each extra target layer

    def rows(self, count: int) -> Outputs:
        """The first ``count`` images' outputs (every output is batch-first)."""
        cut = {k: v if v is None else v[:count] for k, v in vars(self).items() if k != "scales"}
        return Outputs(**cut, scales=tuple(tuple(a[:count] for a in s) for s in self.scales))

    @staticmethod
    def concatenate(parts: list[Outputs]) -> Outputs:
        """The outputs of consecutive batches as one."""
        joined = {k: None if getattr(parts[0], k) is None else np.concatenate([getattr(p, k) for p in parts])
                  for k in vars(parts[0]) if k != "scales"}  # fmt: skip
        scales = tuple(tuple(np.concatenate([p.scales[i][j] for p in parts]) for j in range(3))
                       for i in range(len(parts[0].scales)))  # fmt: skip
        return Outputs(**joined, scales=scales)


def _pad_rows(values: np.ndarray, count: int) -> np.ndarray:
    """``values`` with its last row repeated up to ``count`` rows."""
    return np.concatenate([values, np.repeat(values[-1:], count - len(values), axis=0)])


def _providers(provider: str | None) -> list[str]:
    available = ort.get_available_providers()
    if provider is None:
        return ["CPUExecutionProvider"]
    by_short = {p.removesuffix("ExecutionProvider").lower(): p for p in available}
    chosen = by_short.get(provider.lower().removesuffix("executionprovider"), provider)
    if chosen not in available:
        raise OnnxcamError(f"provider {provider!r} is not available here; available: {', '.join(available)}")
    return [chosen] + (["CPUExecutionProvider"] if chosen != "CPUExecutionProvider" else [])


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def how_to_make_a_model(path: Path) -> str:
    """What to run on this host to get an onnxcam model at ``path``."""
    if installed("torch") and installed("onnx") and installed("onnxcam_export"):
        arch = path.stem if path.stem in contract.ARCHS else "efficientnet_lite0"  # (models/vgg16.onnx: vgg16)
        return f"create it with: onnxcam export --arch {arch} --out {path}"
    if installed("onnx") and installed("onnxcam_export"):
        return f"graft an ONNX classifier with: onnxcam export --from MODEL.onnx --out {path}"
    return (
        "this host has the runtime only: copy here a model made by `onnxcam export` on a machine with the "
        "export side (pip install '.[export]' from the onnxcam clone)"
    )


def _check_model_path(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise OnnxcamError(f"model file {path} not found; {how_to_make_a_model(path)}") from None
    except OSError as exc:
        raise OnnxcamError(f"cannot read model {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        found = sorted(p.name for p in path.glob("*.onnx"))[:5]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise OnnxcamError(f"--model {path} is a folder{hint}; give the path of an onnxcam .onnx file")
    if not stat.S_ISREG(mode):
        raise OnnxcamError(f"model {path} is not a regular file; give the path of an onnxcam .onnx file")


NO_PREPACKING = "session.disable_prepacking"
NO_SPINNING = "session.intra_op.allow_spinning"


def sharing_cores(session_options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """``session_options`` for a session that shares the cores with other work: a folder run decodes and writes images
    while ONNX Runtime runs, a Ray node runs several actors. Its idle threads sleep instead of spinning,
    which would take the cores that work needs; one call alone keeps ORT's spinning, which saves latency.
    """
    session_options = session_options or ort.SessionOptions()
    session_options.add_session_config_entry(NO_SPINNING, "0")
    return session_options


def without_prepacking(session_options: ort.SessionOptions, prepack: bool = False) -> ort.SessionOptions:
    """``session_options`` with weight pre-packing off unless the card says ``prepack`` or the caller set it.

    ONNX Runtime pre-packs a constant weight once per node that reads it: VGG16's 411 MB FC1 weight is
    read by the forward Gemm, the full-gradient branch and the head-only copy, and a session peaked at
    1.66 GB for 562 MB of weights. Without pre-packing it peaks at 1.00 GB (0.69 GB with the weights in an
    external data file, which ONNX Runtime maps instead of copying) at the same speed (ratios 0.99 on VGG16
    and Lite0, batch 1 and 8: benchmarks/startup.py). The card's ``prepack`` keeps it where it pays: integer
    kernels repack their weights on every call without it (INT8 / float explain time, batch 1: VGG16 0.76 -> 0.62,
    EfficientNet-Lite0 1.08 -> 0.73), and so do the MatMuls of a transformer's tokens (a CLIP ViT-B/32 explain, one
    prompt: 141 ms without, 89 ms with, as its plain forward with it: benchmarks/clip_cost.py).
    """
    try:
        session_options.get_session_config_entry(NO_PREPACKING)
    except RuntimeError:  # not set by the caller
        session_options.add_session_config_entry(NO_PREPACKING, "0" if prepack else "1")
    return session_options


def _varint(data: BinaryIO) -> int | None:
    """One protobuf varint from ``data``; None at its end."""
    value, shift = 0, 0
    while byte := data.read(1):
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    return None


FIXED_SIZES = {1: 8, 5: 4}  # protobuf wire types 1 (64-bit) and 5 (32-bit): their sizes in bytes


def _fields(data: BinaryIO, wanted: set[int], varints: frozenset[int] = frozenset()) -> Iterator[tuple[int, object]]:
    """(field number, bytes) of the length-delimited fields ``wanted`` of the protobuf message in ``data``, and
    (field number, int) of its ``varints`` fields; the others are skipped unread. Stops at the end, or at a wire
    type no ONNX field has (not an ONNX file)."""
    while (key := _varint(data)) is not None:
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = _varint(data)
            if number in varints and value is not None:
                yield number, value
        elif wire in FIXED_SIZES:
            data.seek(FIXED_SIZES[wire], io.SEEK_CUR)
        elif wire == 2 and (size := _varint(data)) is not None:
            if number in wanted:
                yield number, data.read(size)
            else:
                data.seek(size, io.SEEK_CUR)
        else:
            return


MODEL_METADATA, KEY, VALUE = 14, 1, 2  # ModelProto.metadata_props, StringStringEntryProto.key and .value
IR_VERSION = 1  # ModelProto.ir_version (a varint)


def ir_version(path: Path) -> int | None:
    """The IR version of ONNX file ``path``, read without parsing the rest; None if it has none."""
    with path.open("rb") as data:
        return next((value for _, value in _fields(data, set(), frozenset({IR_VERSION}))), None)


def file_metadata(path: Path) -> dict[str, str]:
    """The metadata of ONNX file ``path``, read without parsing its graph (which may hold the weights): what
    a session needs to know before it is built. Empty for a file that is not ONNX."""
    with path.open("rb") as data:
        entries = [entry for _, entry in _fields(data, {MODEL_METADATA})]
    pairs = [dict(_fields(io.BytesIO(entry), {KEY, VALUE})) for entry in entries]
    return {p.get(KEY, b"").decode(errors="replace"): p.get(VALUE, b"").decode(errors="replace") for p in pairs}


def _threshold_feeds(thresholds: dict[str, float]) -> dict[str, np.ndarray]:
    """A detector's threshold inputs; each must be a number in [0, 1]."""
    feeds = {}
    for name, value in thresholds.items():
        if name not in contract.DEFAULT_THRESHOLDS:
            raise OnnxcamError(f"unknown threshold {name!r}; a detector takes {', '.join(contract.DEFAULT_THRESHOLDS)}")
        if not 0.0 <= value <= 1.0:
            option = {contract.CONF_THRESHOLD: "--conf", contract.IOU_THRESHOLD: "--iou"}[name]
            raise OnnxcamError(f"{option} ({name}) must be a number from 0 to 1, got {value}")
        feeds[name] = np.asarray(value, np.float32)
    return feeds


class Engine:
    """Loads a model once; :meth:`run` is one ORT call for a batch and T targets."""

    def __init__(
        self, path: str | Path, provider: str | None = None, session_options: ort.SessionOptions | None = None
    ) -> None:
        path = Path(path)
        _check_model_path(path)
        providers = _providers(provider)
        try:
            facts = file_metadata(path)
        except OSError as exc:
            raise OnnxcamError(f"cannot read model {path}: {exc.strerror}") from None
        prepack = facts.get(contract.META_PREFIX + "prepack", facts.get(contract.META_PREFIX + "quantized"))
        session_options = without_prepacking(session_options or ort.SessionOptions(), prepack == "true")  # (older
        # files' cards have no ``prepack``: their integer kernels said it)
        session_options.log_severity_level = 3  # ORT's warnings (e.g. about the overridable default input): noise
        try:
            self.session = ort.InferenceSession(str(path), session_options, providers=providers)
        except Exception as exc:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
            if type(exc).__name__ == "InvalidProtobuf":
                raise OnnxcamError(
                    f"{path} is not an ONNX model (ONNX Runtime cannot parse it); give the .onnx file that "
                    "onnxcam export wrote"
                ) from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxcamError(f"could not load model {path}: {first}") from None
        self.card = ModelCard.from_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        self.path = path
        self.outputs = frozenset(o.name for o in self.session.get_outputs())  # the contract's optional ones too
        given = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        self.inputs = frozenset(i.name for i in given)  # those with a default too
        self._check_graph()
        batch = next(i.shape[0] for i in self.session.get_inputs() if i.name == contract.IMAGE)
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None  # a file exported at batch B
        self._empty_batch = 0 if self.card.empty_batch else 1  # the image batch head-only passes feed (1 where the
        # model cannot take 0: where it raises, found on the first pass; where ORT would abort, said by the card)
        self.positions = next(o.shape[1] for o in self.session.get_outputs() if o.name == contract.LOGITS)
        # (a recogniser's: how many characters its text can hold, its steps)

    def _check_graph(self) -> None:
        """The contract's inputs and outputs exist, and the card agrees with the graph's shapes."""
        outputs = {o.name: o for o in self.session.get_outputs()}
        inputs = {i.name: i for i in self.session.get_inputs()}
        if not set(contract.OUTPUTS) <= set(outputs) or not {contract.IMAGE, contract.TARGETS} <= set(inputs):
            raise OnnxcamError(f"{self.path} lacks the onnxcam inputs/outputs; re-create it with onnxcam export")
        classes = outputs[contract.LOGITS].shape[1]  # [N, K], or a detector's [N, K, A]
        symbols = self.card.task == "recognition"  # (a recogniser's [N, L] runs over positions, its labels symbols)
        if isinstance(classes, int) and classes != len(self.card.labels) and not symbols:
            raise OnnxcamError(
                f"{self.path}: its model card names {len(self.card.labels)} classes but the model scores {classes}; "
                "re-create it with the right --labels"
            )
        size = inputs[contract.IMAGE].shape[1:3]
        if all(isinstance(d, int) for d in size) and tuple(size) != self.card.input_size:
            raise OnnxcamError(
                f"{self.path}: its model card says input size {list(self.card.input_size)} but the graph takes "
                f"{list(size)}; re-create the model with onnxcam export"
            )
        problem = self._card_problem(outputs, {*inputs, *self.inputs})
        if problem:
            raise OnnxcamError(f"{self.path}: its model card {problem}; the card does not describe this graph: "
                               "re-create the model with onnxcam export")  # fmt: skip

    def _card_problem(self, outputs: dict, inputs: set[str]) -> str | None:
        """What of the card the graph contradicts (its task, its extra layers, its in-graph methods), or None."""
        card, rank = self.card, len(outputs[contract.LOGITS].shape)
        boxes = set(contract.DETECTION_OUTPUTS) <= set(outputs)
        task_fits = {
            "classification": rank == 2 and not boxes,
            "detection": rank == 3,
            "segmentation": rank == 2 and contract.REGION in inputs,
            "recognition": rank == 2,
            "regression": rank == 2 and not boxes,
            "similarity": rank == 2 and contract.REFERENCES in inputs,
        }
        if not task_fits[card.task] or not set(contract.TASK_OUTPUTS[card.task]) <= set(outputs):
            return f"says task {card.task!r} but the graph's outputs are not a {card.task} model's"
        layers = sum(contract.scale_output(contract.ACTIVATIONS, i) in outputs for i in range(1, 64))
        if layers != len(card.extra_layers):
            return f"names {len(card.extra_layers)} extra target layers but the graph has {layers}"
        from onnxcam.methods import in_graph  # (methods reads engines: imported when a card is checked)

        methods, known = list(card.saliency_methods), in_graph(card.has_gradients)
        if (contract.SALIENCY in outputs) != bool(methods) or methods != known[: len(methods)]:
            return (f"lists the in-graph methods {methods} but the graph's saliency output computes "
                    f"{known if contract.SALIENCY in outputs else 'none'} in that order")
        return None

    def run(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        full_gradients: bool = False,
        attention: tuple[str, ...] = (),
        saliency: str | None = None,
        thresholds: dict[str, float] | None = None,
        region: np.ndarray | None = None,
        references: np.ndarray | None = None,
        pixels: bool = False,
        steering: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        guided: bool = False,
    ) -> Outputs:
        """``images`` uint8 ``[N, H, W, 3]`` RGB at the model's size; ``targets`` int64 ``[N, T]``.

        ``attention``: the optional outputs wanted too (``attentions``, ``attention_gradients``).
        ``saliency``: also return the graph's finished map of that method (one of the card's
        ``saliency_methods``) at the model's input size. ``thresholds``: a detector's
        ``conf_threshold`` / ``iou_threshold`` where not the graph's defaults; its boxes come too. ``region``:
        a segmenter's float ``[N, H, W]`` pixel weights that each class's score sums its logits over, where not
        the pixels predicted as the class. ``references``: a similarity model's ``[R, D]`` embeddings that its
        targets (0 .. R - 1) compare each image's with. ``pixels``: also the explained scores' gradients at the
        model's float input (a file exported with ``--pixels``). ``steering``: such a file's rows run on
        ``baselines + alphas * (pixels - baselines) + noise`` instead of their pixels: ``(alphas [N], baselines
        [N or 1, C, H, W], noise [N or 1, C, H, W])`` in the model's normalised input space (default 1, 0, 0).
        ``guided``: also Guided Backpropagation's gradients there (the same file).
        """
        height, width = self.card.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (height, width, 3):
            raise ValueError(f"images must be uint8 [N, {height}, {width}, 3], got {images.dtype} {images.shape}")
        if targets.ndim != 2 or targets.shape[0] != images.shape[0]:
            raise ValueError(f"targets must be [N, T] with N = {images.shape[0]}, got {targets.shape}")
        fixed = self.fixed_batch
        if fixed is not None and len(images) != fixed:  # a file exported at a fixed batch: run it B images at a time
            if steering is not None:
                raise OnnxcamError(f"{self.path} has a fixed batch of {fixed}; pixel attributions need a dynamic one")
            options = {"full_gradients": full_gradients, "attention": attention, "saliency": saliency,
                       "thresholds": thresholds, "references": references, "pixels": pixels,
                       "guided": guided}  # fmt: skip
            parts = []
            for start in range(0, len(images), fixed):
                count = min(fixed, len(images) - start)
                cut = [None if a is None else _pad_rows(a[start : start + count], fixed)
                       for a in (images, targets, region)]  # fmt: skip
                parts.append(self.run(cut[0], cut[1], region=cut[2], **options).rows(count))
            return Outputs.concatenate(parts)
        feeds = {
            contract.IMAGE: images,
            contract.TARGETS: targets.astype(np.int64),
            contract.FULL_GRADIENTS: np.asarray(full_gradients),
        }
        missing = set(attention) - self.outputs
        if missing:
            raise OnnxcamError(
                f"{self.path} has no {', '.join(sorted(missing))} output: only vision transformers grafted at a "
                "token layer have attention maps; use a Grad-CAM method"
            )
        feeds |= {ATTENTION_FLAGS[name]: np.asarray(True) for name in attention}
        names = [*contract.OUTPUTS, *attention, *contract.TASK_OUTPUTS[self.card.task]]
        if guided and contract.RETURN_GUIDED not in self.inputs:
            raise OnnxcamError(f"{self.path} has no guided backward to its input (Guided Backpropagation): export it "
                               "again with --pixels")  # fmt: skip
        if contract.RETURN_PIXELS in self.inputs:
            feeds[contract.RETURN_PIXELS] = np.asarray(pixels)
            feeds |= self._steering_feeds(len(images), steering)
            names += [contract.PIXELS, contract.PIXEL_GRADIENTS]
            if contract.RETURN_GUIDED in self.inputs:
                feeds[contract.RETURN_GUIDED] = np.asarray(guided)
                names.append(contract.GUIDED_GRADIENTS)
        elif pixels:
            self.require_pixels()
        names += [contract.INSTANCE_MASKS] if contract.INSTANCE_MASKS in self.outputs else []
        feeds |= self._task_feeds(len(images), thresholds or {}, region, references)
        if saliency is not None:
            feeds |= self._saliency_feeds(saliency)
            names.append(contract.SALIENCY)
        elif self.card.saliency_methods:
            feeds |= {contract.RETURN_SALIENCY: np.asarray(False), contract.SALIENCY_METHOD: np.asarray(0, np.int64)}
        scales = [contract.scale_output(n, i) for i in range(1, len(self.card.extra_layers) + 1)
                  for n in contract.SCALE_OUTPUTS]  # fmt: skip
        values = dict(zip(names + scales, self.session.run(names + scales, feeds), strict=True))
        per_scale = [values.pop(name) for name in scales]
        grouped = tuple(tuple(per_scale[i : i + 3]) for i in range(0, len(per_scale), 3))
        return Outputs(**values, scales=grouped)

    def require_pixels(self) -> None:
        """Refuse, in one line, a file without the backward to its input (``export --pixels``)."""
        if contract.RETURN_PIXELS not in self.inputs:
            raise OnnxcamError(f"{self.path} has no backward to its input (pixel attributions): export it again "
                               "with --pixels")  # fmt: skip

    def _steering_feeds(self, count: int, steering: tuple | None) -> dict[str, np.ndarray]:
        """A file with pixels: each row's alpha, baseline and noise (none given: its own pixels)."""
        if steering is None:
            height, width = self.card.input_size
            none = np.zeros((1, 3, height, width), np.float32)
            return {contract.PIXEL_ALPHAS: np.ones(count, np.float32), contract.PIXEL_BASELINES: none,
                    contract.PIXEL_NOISE: none}  # fmt: skip
        alphas, baselines, noise = (np.ascontiguousarray(v, np.float32) for v in steering)
        return {contract.PIXEL_ALPHAS: alphas, contract.PIXEL_BASELINES: baselines, contract.PIXEL_NOISE: noise}

    def _task_feeds(self, count: int, thresholds: dict[str, float], region: np.ndarray | None,
                    references: np.ndarray | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """The inputs of the model's task (:data:`TASK_FEEDS`: a detector's thresholds, a segmenter's region),
        refusing another task's."""
        if thresholds and self.card.task != "detection":
            raise OnnxcamError(f"{self.path} is a {self.card.task} model: thresholds apply to detectors only")
        if region is not None and contract.REGION not in self.inputs:
            raise OnnxcamError(f"{self.path} takes no region: a mask applies to segmenters; re-export it")
        if references is not None and self.card.task != "similarity":
            raise OnnxcamError(f"{self.path} is a {self.card.task} model: references apply to similarity models")
        if self.card.task == "similarity":
            return self._similarity_feeds(references)
        return TASK_FEEDS[self.card.task](self, count, thresholds, region)

    def _similarity_feeds(self, references: np.ndarray | None) -> dict[str, np.ndarray]:
        """The references ``[R, D]`` (none given: one zero vector, whose similarity is 0: a call for embeddings)."""
        declared = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        width = next(i.shape[1] for i in declared if i.name == contract.REFERENCES)
        found = np.zeros((1, width), np.float32) if references is None else np.asarray(references, np.float32)
        if found.ndim != 2 or found.shape[1] != width or not len(found):
            raise OnnxcamError(f"references must be [R, {width}] embeddings (R >= 1), got {list(found.shape)}")
        return {contract.REFERENCES: found}

    def _detection_feeds(self, count: int, thresholds: dict[str, float], region: None) -> dict[str, np.ndarray]:
        feeds = _threshold_feeds(thresholds)
        if contract.IOU_THRESHOLD in feeds and contract.IOU_THRESHOLD not in self.inputs:
            raise OnnxcamError(f"{self.path} is a set-prediction detector (DETR): it suppresses no box, so an "
                               "IoU threshold does not apply")  # fmt: skip
        return feeds

    def _segmentation_feeds(self, count: int, thresholds: dict, region: np.ndarray | None) -> dict[str, np.ndarray]:
        if region is None:
            return {}
        height, width = self.card.input_size
        if region.shape != (count, height, width):
            raise ValueError(f"region must be [N, {height}, {width}] with N = {count}, got {region.shape}")
        return {contract.REGION: np.asarray(region, np.float32)}

    def _saliency_feeds(self, method: str) -> dict[str, np.ndarray]:
        """The inputs that ask the graph for its ``saliency`` map of ``method``."""
        available = self.card.saliency_methods
        if method not in available:
            have = f"it computes {', '.join(available)}" if available else "it has no saliency output"
            raise OnnxcamError(f"{self.path} cannot compute the {method} map in the graph ({have}); "
                               "re-export it with this onnxcam, or use the Python path")  # fmt: skip
        return {
            contract.RETURN_SALIENCY: np.asarray(True),
            contract.SALIENCY_METHOD: np.asarray(available.index(method), dtype=np.int64),
        }

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits ``[N, K]`` alone, for a batch of model-size uint8 RGB images (extra passes of a method)."""
        return self.run(images, np.zeros((len(images), 1), np.int64)).logits

    def run_head(self, activations: np.ndarray) -> np.ndarray:
        """Logits ``[M, K]`` of the head alone (target layer -> logits) for ``activations [M, C, h, w]``.

        The image batch is empty, so the backbone does no work.
        """
        inputs = {i.name: i for i in [*self.session.get_inputs(), *self.session.get_overridable_initializers()]}
        if contract.HEAD_ACTIVATIONS not in inputs:
            raise OnnxcamError(f"{self.path} has no head-only graph (its head is not a cut); re-export it")
        if not isinstance(inputs[contract.IMAGE].shape[0], str):
            raise OnnxcamError(f"{self.path} has a fixed batch size; head-only passes need a dynamic batch")
        height, width = self.card.input_size
        feeds = {
            contract.IMAGE: np.zeros((self._empty_batch, height, width, 3), np.uint8),
            contract.TARGETS: np.zeros((self._empty_batch, 1), np.int64),
            contract.HEAD_ACTIVATIONS: np.ascontiguousarray(activations, dtype=np.float32),
            contract.RUN_HEAD: np.asarray(True),
        }
        if self.card.saliency_methods:
            feeds |= {contract.RETURN_SALIENCY: np.asarray(False), contract.SALIENCY_METHOD: np.asarray(0, np.int64)}
        feeds |= {name: np.asarray(False) for name in (contract.RETURN_PIXELS, contract.RETURN_GUIDED)
                  if name in self.inputs}  # fmt: skip
        if contract.RETURN_PIXELS in self.inputs:
            feeds |= self._steering_feeds(self._empty_batch, None)
        try:
            return self.session.run([contract.HEAD_LOGITS], feeds)[0]
        except Exception as exc:  # ORT's Fail: e.g. a Reshape to [-1, ...] cannot take an empty batch
            if self._empty_batch:
                raise
            warnings.warn(
                f"{self.path.name} cannot run an empty image batch ({str(exc).splitlines()[0][:120]}); "
                "head-only passes feed one blank image instead, so the backbone runs once per pass",
                stacklevel=2,
            )
            self._empty_batch = 1
            return self.run_head(activations)


# each task's own inputs, fed by the engine (a classifier's: none)
TASK_FEEDS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "classification": lambda engine, count, thresholds, region: {},
    "recognition": lambda engine, count, thresholds, region: {},
    "regression": lambda engine, count, thresholds, region: {},
    "segmentation": Engine._segmentation_feeds,
    "detection": Engine._detection_feeds,
}
