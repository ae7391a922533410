"""The onnxcam graph contract: names, and the model card that the exporter and the runtime share.

One ``.onnx`` file is the whole explainer:

inputs
    ``image``           uint8 ``[N, H, W, 3]``, RGB: the photo fitted to ``H x W`` as the card's
                        ``resize`` convention says (:mod:`onnxcam.geometry`: stretch, letterbox,
                        centre crop, padding); the normalisation (mean/std, layout) happens
                        inside the graph.
    ``targets``         int64 ``[N, T]``: ``c >= 0`` asks for class ``c``; ``-k`` asks for
                        the k-th highest-scoring class of that image (``-1`` = top-1), so
                        top-k explanations need no second call.
    ``full_gradients``  bool scalar, default ``False``. The per-channel weights never need
                        it; set it when a method needs the full gradient tensor.
    ``head_activations`` float ``[M, C, h, w]``, default empty: activations to send through
                        the head alone (target layer -> logits), e.g. with channels ablated.
                        The head runs only when ``run_head`` (bool, default ``False``) is
                        set; with an empty ``image`` batch the backbone costs nothing.
    ``with_attentions`` / ``with_attention_gradients``  bool scalars, default ``False``, on
                        vision transformers only (see ``attentions``).
    ``return_saliency`` bool scalar, required: compute the ``saliency`` output.
    ``saliency_method`` int64 scalar, required: which map ``saliency`` holds, an index into
                        the card's ``saliency_methods`` (0 = ``gradcam``). Methods that need the
                        full gradient build it for this call whatever ``full_gradients`` says.
                        (Required, not defaulted: ONNX Runtime's JavaScript bindings cannot
                        override an input that has a default, so these two have none.)
    ``conf_threshold`` / ``iou_threshold``  float scalars, detectors only (defaults 0.25 / 0.45):
                        the non-maximum suppression that resolves ``-k`` targets (see below). A
                        set predictor (DETR) suppresses nothing and has no ``iou_threshold``.
    ``region``          float ``[N, H, W]`` (the input size), segmenters only: the weights of the pixels
                        whose logits a class's score sums (a user's mask: 1 inside, 0 outside);
                        default ``[1, 1, 1]`` of -1, where negative: the pixels predicted as the class.
outputs
    ``logits``          float ``[N, K]``; a detector's are its class scores ``[N, K, A]`` (A anchors)
    ``activations``     float ``[N, C, h, w]``  (the target layer)
    ``weights``         float ``[N, T, C]``: spatial mean of d logit / d activations
    ``gradients``       float ``[N, T, C, h, w]`` when ``full_gradients`` is true, else
                        an empty ``[N, T, C, 0, 0]``
    ``target_classes``  int64 ``[N, T]``: the class each target row explains
    ``head_logits``     float ``[M, K]``: the head's logits for ``head_activations``
    ``attentions``      float ``[N, L, H, T, T]``: the attention probabilities of the L blocks
                        (H heads, T = P prefix + h*w grid tokens, the target layer's tokens) when
                        ``with_attentions``, else ``[N, 0, 0, 0, 0]``; only in files grafted at a
                        token layer whose blocks' Softmax mixes those tokens (ViT, DeiT)
    ``attention_gradients``  float ``[N, T, L, H, T, T]``: d score / d attentions for each target
                        row when ``with_attention_gradients``, else ``[N, T, 0, 0, 0, 0]``
    ``saliency``        float32 ``[N, T, H, W]`` in [0, 1] when ``return_saliency``, else an
                        empty ``[N, T, 0, 0]``: the finished map at the model's input size
                        (the method's channel sum, ReLU, bilinear resize with half-pixel
                        centres, min-max per map; an all-zero map stays zero, never NaN)

Tasks (the card's ``task``) differ only in the explained scalar of a target row:

classification      the logit (or probability) of class ``c``.
segmentation        the model outputs ``[N, K, H, W]``; ``logits[n, c]`` is the sum of class c's
                    logits over the pixels predicted as c, or weighted by ``region`` where given
                    (pytorch-grad-cam's SemanticSegmentationTarget with its mask), computed in the
                    graph, and is explained as above. Extra output: ``pixel_shares`` float
                    ``[N, K]``, the fraction of the input's pixels predicted as each class (what a
                    segmenter's prediction table shows: its masked sums have no softmax meaning).
detection           the model outputs ``[N, 4 + K, A]`` (ultralytics: cx, cy, w, h and K class
                    scores per anchor; or another layout of the exporter's registry: YOLOv5, SSD's
                    scores and boxes, DETR's queries, whose softmax without no-object is the score),
                    whose class scores are ``logits`` ``[N, K, A]``. ``c >= 0`` asks for the score of
                    class ``c // A`` at anchor ``c % A``; ``-k`` for the k-th highest-scoring detection
                    kept by the non-maximum suppression in the graph (each anchor scored by its best
                    class, NMS per class as ultralytics' ``non_max_suppression``; never the card's
                    ``background`` class; DETR: no suppression, the k-th query by score). Extra outputs,
                    per target row:
                    ``boxes`` float ``[N, T, 4]`` (x1, y1, x2, y2 in input pixels, as the model outputs
                    them: not clipped to the image; ``explain`` clips), ``box_scores``
                    float ``[N, T]`` and ``box_anchors`` int64 ``[N, T]``; a ``-k`` row with no k-th
                    detection has anchor and class -1, a zero box and score, and zero gradients.
                    An instance segmenter (ultralytics ``-seg``) also returns ``instance_masks`` float
                    ``[N, T, h, w]``: each row's mask logits at its prototypes' resolution (its coefficients
                    times the prototypes, zero on a row with no detection); its mask is where they are above 0
                    once upsampled to the input, inside its box (ultralytics' ``process_mask``).

recognition         the model outputs per-step scores ``[N, L, K]`` over K symbols (CTC text recognition:
                    CRNN, SVTR), the card's ``background`` the CTC blank. The graph decodes greedily (the best
                    symbol per step, repeats collapsed, blanks dropped, as PaddleOCR's ``CTCLabelDecode``);
                    ``logits`` ``[N, L]`` holds one score per character position j: the sum of character j's
                    softmax probability over the steps it was decoded from (0 beyond the decoded length).
                    ``c >= 0`` asks for the character at position c (0 = the first). Extra outputs:
                    ``characters`` int64 ``[N, L]`` (each position's symbol, an index into the labels; -1
                    beyond the text) and ``character_probabilities`` float ``[N, L]`` (each character's
                    probability at its first step, the confidence PaddleOCR reports).

regression          the model outputs ``[N, D]`` values (a quality score, a landmark's coordinates, an age),
                    ``logits`` as they are (the card's ``score`` is ``value``); ``c >= 0`` asks for output
                    coordinate c, and its map shows where the evidence raises that value (Grad-CAM keeps the
                    positive part of the gradient's direction).

similarity          the model outputs an embedding ``[N, D]`` (face recognition, re-identification, retrieval,
                    an image tower); the input ``references`` float ``[R, D]`` holds the embeddings to compare
                    with; ``logits`` ``[N, R]`` is the cosine similarity of the image's embedding to each, and
                    ``c >= 0`` asks for reference c. Extra output: ``embeddings`` ``[N, D]``, the image's own
                    embedding, L2-normalised (another call's reference). Its labels name nothing: its
                    references are given with each call. An image-text model's image tower (CLIP) has the
                    card's ``logit_scale``: ``logits`` is ``logit_scale`` times the cosine, the model's own
                    image-text logit, and its score may be ``probability`` (the softmax over the references);
                    the card's ``text`` names its text tower and tokenizer, beside the file, whose embeddings
                    of text prompts are the references (``explain --prompt``).

Several target layers (the card's ``extra_layers``, e.g. a detector's scales): the first is
``activations`` as above; each further one, i = 1, 2, ..., has its own ``activations/i``
``[N, C_i, h_i, w_i]``, ``weights/i`` ``[N, T, C_i]`` and ``gradients/i`` (full when
``full_gradients``), for the same targets. The maps of the layers are combined as
pytorch-grad-cam's multi-layer aggregation does, also in the file's ``saliency`` output (at the finest
grid of the layers).

A gradient-free file (the card's ``weights_path`` ``none``: a classifier whose backward could not be built, an
op without a rule or control flow between the target layer and the logits) has the same inputs and outputs, with
``weights`` ``[N, T, 0]`` and ``gradients`` ``[N, T, 0, 0, 0]``: its ``saliency`` output computes ReciproCAM (the
head run on each location of the target layer kept alone, in one batch; the card's ``saliency_methods`` is
``reciprocam``), and its head-only graph serves the gradient-free methods of :mod:`onnxcam.methods`.

The model card (:class:`ModelCard`) is stored as ``onnxcam.*`` metadata strings.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import resources

from onnxcam.errors import OnnxcamError
from onnxcam.geometry import Resize

CONTRACT_VERSION = "1"

IMAGE = "image"
TARGETS = "targets"
FULL_GRADIENTS = "full_gradients"
HEAD_ACTIVATIONS = "head_activations"
RUN_HEAD = "run_head"
RETURN_SALIENCY = "return_saliency"
REGION = "region"
SALIENCY_METHOD = "saliency_method"
RETURN_PIXELS = "return_pixels"  # a file grafted with its backward to the input: whether to build it this call
RETURN_GUIDED = "return_guided"  # and whether to build its guided backward (Guided Backpropagation's) this call

LOGITS = "logits"
ACTIVATIONS = "activations"
WEIGHTS = "weights"
GRADIENTS = "gradients"
TARGET_CLASSES = "target_classes"
HEAD_LOGITS = "head_logits"
SALIENCY = "saliency"
OUTPUTS = (LOGITS, ACTIVATIONS, WEIGHTS, GRADIENTS, TARGET_CLASSES)
WITH_ATTENTIONS = "with_attentions"
WITH_ATTENTION_GRADIENTS = "with_attention_gradients"
ATTENTIONS = "attentions"
ATTENTION_GRADIENTS = "attention_gradients"
CONF_THRESHOLD = "conf_threshold"
IOU_THRESHOLD = "iou_threshold"
BOXES = "boxes"
BOX_SCORES = "box_scores"
BOX_ANCHORS = "box_anchors"
DETECTION_OUTPUTS = (BOXES, BOX_SCORES, BOX_ANCHORS)
PIXEL_SHARES = "pixel_shares"
INSTANCE_MASKS = "instance_masks"  # an instance segmenter's (ultralytics -seg): [N, T, h, w] mask logits per row
REFERENCES = "references"  # a similarity model's input: the [R, D] embeddings its targets are compared with
EMBEDDINGS = "embeddings"  # a similarity model's output: the image's own embedding [N, D], L2-normalised
CHARACTERS = "characters"
PIXELS = "pixels"  # such a file's: the model's float input [N, C, H, W] (after the in-graph normalisation)
PIXEL_GRADIENTS = "pixel_gradients"  # and the explained scores' gradient at it, [N, T, C, H, W] (when asked for)
GUIDED_GRADIENTS = "guided_gradients"  # and their guided backward there (the ReLUs pass only positive gradients)
# such a file's forward runs on baselines + alphas * (pixels - baselines) + noise, per row: 1, 0 and 0 for a plain
# call; Integrated Gradients' interpolation steps and SmoothGrad's noisy copies as rows of one batch
PIXEL_ALPHAS, PIXEL_BASELINES, PIXEL_NOISE = "pixel_alphas", "pixel_baselines", "pixel_noise"
CHARACTER_PROBABILITIES = "character_probabilities"
# each task's own outputs beside the contract's (see above), which every call returns
TASK_OUTPUTS = {"classification": (), "segmentation": (PIXEL_SHARES,), "detection": DETECTION_OUTPUTS,
                "recognition": (CHARACTERS, CHARACTER_PROBABILITIES), "regression": (), "similarity": (EMBEDDINGS,)}
DEFAULT_THRESHOLDS = {CONF_THRESHOLD: 0.25, IOU_THRESHOLD: 0.45}  # ultralytics' predict defaults
SCALE_OUTPUTS = (ACTIVATIONS, WEIGHTS, GRADIENTS)  # what each extra target layer has (see scale_output)


def scale_output(name: str, scale: int) -> str:
    """The output ``name`` (activations, weights, gradients) of extra target layer ``scale`` (1, 2, ...)."""
    return f"{name}/{scale}"


META_PREFIX = "onnxcam."
# how the `weights` output is computed; none: the backward could not be built (an op without a rule), so the file
# carries no gradients (`weights` [N, T, 0], `gradients` [N, T, 0, 0, 0]) and computes ReciproCAM in its graph
WEIGHTS_PATHS = ("presummed", "gradient-mean", "none")
SCORES = ("logit", "probability", "value")  # the explained score: a class logit, its softmax, a regressor's output
TASKS = ("classification", "segmentation", "detection", "recognition", "regression", "similarity")  # (see above)
ARCHS = ("efficientnet_lite0", "vgg16", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
         "densenet121", "convnext_tiny")  # onnxcam export --arch: the first two are onnxcam's, the rest torchvision's
# an image-text model's text tower (the card's ``text``): its file and tokenizer beside the model, the tokens it
# takes (a fixed length, padded with ``pad``, or null: each prompt as long as it is) and its inputs' names
TEXT_TOWER = ("model", "tokenizer", "length", "pad", "ids", "mask")
MAX_TEXT_LENGTH = 4096
MAX_INPUT_SIDE = 4096  # an input side beyond this is a broken card, not a model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names, in index order (torchvision's spelling)."""
    text = resources.files("onnxcam").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


@dataclass(frozen=True)
class ModelCard:
    """What the ``.onnx`` file says about itself (``onnxcam info`` prints it).

    ``mean``/``std`` are on the 0..1 scale in RGB order and are applied inside the graph;
    ``trained`` is False for seeded random weights (their maps mean nothing); ``score`` is what
    the gradients differentiate: the class logit (the Grad-CAM paper) or its softmax probability.
    """

    arch: str
    weights: str
    layer: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    labels: tuple[str, ...]
    weights_path: str
    trained: bool = True
    score: str = "logit"
    channel_order: str = "RGB"
    notes: str = ""
    contract: str = CONTRACT_VERSION
    saliency_methods: tuple[str, ...] = ()  # the maps the graph can finish itself, by saliency_method index
    task: str = "classification"  # one of TASKS
    extra_layers: tuple[str, ...] = ()  # more target layers after ``layer``, described as it is
    background: int | None = None  # a detector's background class (never a detection) or a recogniser's CTC blank
    quantized: bool = False  # the graph runs integer kernels (Quantize/DequantizeLinear or QLinear ops)
    prepack: bool = False  # ONNX Runtime should pre-pack its weights (engine.without_prepacking says when)
    resize: dict = field(default_factory=dict)  # how a photo becomes the input (geometry.Resize); {}: a stretch
    sources: dict = field(default_factory=dict)  # fact (labels, size, mean, ...) -> where the exporter found it
    empty_batch: bool = True  # head-only passes may feed an empty image batch (not where ORT aborts on one: LSTM)
    logit_scale: float | None = None  # an image-text model's: logits = logit_scale * cosine (CLIP's exp(t))
    text: dict = field(default_factory=dict)  # an image-text model's text tower beside the file (see TEXT_TOWER)

    @property
    def has_gradients(self) -> bool:
        """Whether the file carries its backward (one whose backward could not be built is gradient-free)."""
        return self.weights_path != "none"

    @property
    def resizing(self) -> Resize:
        """The resize convention the model's pipeline uses (:mod:`onnxcam.geometry`)."""
        return Resize.from_card(self.resize)

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _CHECKS[f.name](getattr(self, f.name))
            if problem:
                raise ValueError(f"model card field {f.name!r} {problem}")
        if self.background is not None and self.background >= len(self.labels):
            raise ValueError(f"model card field 'background' must be a class index, got {self.background}")

    def to_metadata(self) -> dict[str, str]:
        """``onnxcam.<field>`` -> string (JSON for everything that is not a string)."""
        return {
            META_PREFIX + key: value if isinstance(value, str) else json.dumps(value)
            for key, value in asdict(self).items()
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: object) -> ModelCard:
        """Read and validate the card; a missing or malformed field is an OnnxcamError naming it."""
        values = {k[len(META_PREFIX) :]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
        found = values.get("contract")
        if found != CONTRACT_VERSION:
            raise OnnxcamError(
                f"{source} is not an onnxcam model (contract version {found or 'none'}, expected "
                f"{CONTRACT_VERSION}); make one from a classifier with: onnxcam export --from MODEL"
            )
        parsed: dict[str, object] = {}
        for f in fields(cls):
            if f.name not in values:
                if f.default is not MISSING:  # optional
                    continue
                raise OnnxcamError(f"{source}: its model card lacks the field {f.name!r}; re-create it")
            text = values[f.name]
            try:
                parsed[f.name] = text if f.type == "str" else _tuples(json.loads(text))
            except (ValueError, RecursionError):  # JSONDecodeError, a 4300-digit integer, nesting past the stack
                raise OnnxcamError(
                    f"{source}: model card field {f.name!r} is not valid JSON ({text[:40]!r}); re-create the model"
                ) from None
        try:
            return cls(**parsed)  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            raise OnnxcamError(f"{source}: {exc}; re-create the model with onnxcam export") from None

    def rows(self) -> list[tuple[str, str]]:
        """(field, value) pairs for display."""
        height, width = self.input_size
        fmt = ", ".join
        return (
            [
                ("contract", self.contract),
                ("arch", self.arch),
                ("weights", self.weights + ("" if self.trained or "NOT TRAINED" in self.weights else " [NOT TRAINED]")),
                ("target layer", ", ".join([self.layer, *self.extra_layers])),
                (
                    "input",
                    f"uint8 [N, {height}, {width}, 3] {self.channel_order}; normalised in the graph",
                ),
                ("resize", self.resizing.describe()),
                ("mean (0..1)", fmt(f"{v:.4f}" for v in self.mean)),
                ("std (0..1)", fmt(f"{v:.4f}" for v in self.std)),
                ("classes", f"{len(self.labels)} ({fmt(self.labels[:3])}, ...)"),
                ("channel weights", self.weights_path if self.has_gradients else "none: no gradients (the backward "
                 "could not be built, the notes say why); gradient-free methods only, ReciproCAM by default"),
                ("task", self.task),
                *self._background_rows(),
                ("explained score", self.score),
            ]
            + self._saliency_rows()
            + ([("sources", ", ".join(f"{k}: {v}" for k, v in self.sources.items()))] if self.sources else [])
            + ([("notes", self.notes)] if self.notes else [])
        )

    def _background_rows(self) -> list[tuple[str, str]]:
        if self.background is None:
            return []
        never = "the CTC blank, never a character" if self.task == "recognition" else "never a detection"
        return [("background class", f"{self.background} ({self.labels[self.background]}): {never}")]

    def _saliency_rows(self) -> list[tuple[str, str]]:
        if not self.saliency_methods:
            return []
        height, width = self.input_size
        methods = ", ".join(f"{i} {name}" for i, name in enumerate(self.saliency_methods))
        return [("saliency", f"float32 [N, T, {height}, {width}] in the graph; saliency_method: {methods}")]

    def summary(self) -> dict[str, object]:
        """The card without its labels and empty lists (what the exporter prints)."""
        return {k: v for k, v in asdict(self).items() if k != "labels" and v not in ((), None, {})}


def _tuples(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _text(value: object) -> str | None:
    return None if isinstance(value, str) else f"must be a string, got {value!r}"


def _flag(value: object) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


Check = Callable[[object], str | None]


def _triple(positive: bool) -> Check:
    def check(value: object) -> str | None:
        ok = isinstance(value, tuple) and len(value) == 3
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok or (positive and min(value) <= 0):
            return f"must be three finite numbers{' > 0' if positive else ''}, got {value!r}"
        return None

    return check


def _size(value: object) -> str | None:
    ok = isinstance(value, tuple) and len(value) == 2 and all(type(v) is int for v in value)
    if not ok or not all(1 <= v <= MAX_INPUT_SIDE for v in value):
        return f"must be [height, width], two integers from 1 to {MAX_INPUT_SIDE}, got {value!r}"
    return None


def _resize(value: object) -> str | None:
    if not isinstance(value, dict):
        return f"must be an object, got {value!r}"
    try:
        Resize.from_card(value)
    except (OnnxcamError, TypeError) as exc:
        return f"is malformed: {exc}"
    return None


def _text_tower(value: object) -> str | None:
    if value == {}:
        return None
    if not isinstance(value, dict) or set(value) != set(TEXT_TOWER):
        return f"must be {{}} or an object with {', '.join(TEXT_TOWER)}, got {value!r}"
    files = (value["model"], value["tokenizer"])
    if not all(isinstance(f, str) and re.fullmatch(r"[\w.-]+", f) and ".." not in f for f in files):
        return f"must name its files beside the model (plain names), got {files!r}"
    length, pad = value["length"], value["pad"]
    if not (length is None or (type(length) is int and 1 <= length <= MAX_TEXT_LENGTH)) or type(pad) is not int:
        return f"must give a length (1 to {MAX_TEXT_LENGTH} tokens, or null) and a pad id, got {length!r}, {pad!r}"
    if not isinstance(value["ids"], str) or not (value["mask"] is None or isinstance(value["mask"], str)):
        return f"must name the token ids' input (and the mask's, or null), got {value['ids']!r}, {value['mask']!r}"
    return None


def _sources(value: object) -> str | None:
    ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    return None if ok else f"must map facts to where they came from (strings), got {value!r}"


def _labels(value: object) -> str | None:
    if not isinstance(value, tuple) or not value or not all(isinstance(v, str) for v in value):
        return "must be a non-empty list of class names"
    return None


_CHECKS: dict[str, Check] = {
    "arch": _text,
    "weights": _text,
    "layer": _text,
    "notes": _text,
    "contract": _text,
    "input_size": _size,
    "mean": _triple(positive=False),
    "std": _triple(positive=True),
    "labels": _labels,
    "weights_path": lambda v: None if v in WEIGHTS_PATHS else f"must be one of {WEIGHTS_PATHS}, got {v!r}",
    "trained": _flag,
    "quantized": _flag,
    "prepack": _flag,
    "empty_batch": _flag,
    "score": lambda v: None if v in SCORES else f"must be one of {SCORES}, got {v!r}",
    "task": lambda v: None if v in TASKS else f"must be one of {TASKS}, got {v!r}",
    "extra_layers": lambda v: (
        None if isinstance(v, tuple) and all(isinstance(n, str) for n in v) else f"must be a list of layers, got {v!r}"
    ),
    "background": lambda v: None if v is None or (type(v) is int and v >= 0) else f"must be a class index, got {v!r}",
    "resize": _resize,
    "sources": _sources,
    "channel_order": lambda v: None if v == "RGB" else f"must be 'RGB', got {v!r}",
    "logit_scale": lambda v: None if v is None or (type(v) in (int, float) and 0 < v < math.inf) else (
        f"must be a positive number, got {v!r}"),
    "text": lambda v: _text_tower(v),
    "saliency_methods": lambda v: (
        None
        if isinstance(v, tuple) and all(isinstance(n, str) for n in v)
        else f"must be a list of method names, got {v!r}"
    ),
}
