"""What a target row explains beyond a classifier's class logit: segmenters and detectors.

A task is data for the grafter (:func:`onnxcam_export.graft.graft`): a segmenter becomes a
classifier whose logits are computed in the graph from its masks, so everything downstream is
the classifier's; a detector keeps its class scores ``[N, K, A]`` as the logits and resolves its
target rows (``(anchor, class)``, or the k-th detection kept by non-maximum suppression) in the
graph, with default-domain ops only (see :mod:`onnxcam.contract`). A detector's raw outputs (one tensor,
or a pair of class scores and boxes) are cut into class scores and boxes per :data:`DETECTOR_LAYOUTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcam import contract
from onnxcam.errors import OnnxcamError
from onnxcam_export.builder import Builder, Types

SEGMENT_SCORES = "onnxcam/segment_scores"
CLASS_SCORES = "onnxcam/class_scores"
BOXES_XYWH = "onnxcam/boxes_xywh"
RECOGNITION_SCORES = "onnxcam/recognition_scores"
SIMILARITY_SCORES = "onnxcam/similarity_scores"
EXTRA_ROWS = "onnxcam/extra_rows"  # an ultralytics output's rows after its class scores [N, E, A]
RANKED_SCORES = "onnxcam/ranked_scores"  # the class scores with the background column below any score
# (cx, cy, w, h) @ XYWH_TO_XYXY = (cx - w/2, cy - h/2, cx + w/2, cy + h/2)
XYWH_TO_XYXY = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]])
# a pair's boxes [N, A, 4] @ BOX_FORMATS[format] = cx, cy, w, h
BOX_FORMATS = {"xyxy": np.linalg.inv(XYWH_TO_XYXY), "cxcywh": np.eye(4)}
MAX_QUERIES = 300  # a set predictor's queries (DETR 100, Deformable DETR and RT-DETR 300); SSD has thousands of anchors


@dataclass(frozen=True)
class Task:
    """The model's task (one of :data:`contract.TASKS`); a detector's ``boxes`` tensor is ``[N, 4, A]`` cx, cy, w, h."""

    kind: str = "classification"
    boxes: str | None = None
    anchor_axis: int = 2  # a detector's: the axis of its raw output that runs over the anchors
    ranked: str = contract.LOGITS  # the class scores its NMS ranks (:data:`RANKED_SCORES` with a background class)
    nms: bool = True  # False for a set predictor (DETR): none suppressed, the k-th detection is the k-th query
    explained: str | None = None  # the card's ``score`` where the layout fixes it (DETR's: a softmax probability)
    outputs: tuple[str, ...] = ()  # the task's own graph outputs beyond the contract's, ``[N, K]`` each
    every_class: bool = False  # each (anchor, class) pair is a detection (sigmoid DETRs), not an anchor's best class
    background: int | None = None  # a recogniser's CTC blank (a detector's background is the card's, from --background)
    protos: str | None = None  # an instance segmenter's prototype masks [N, E, h, w], its coefficients EXTRA_ROWS


@dataclass(frozen=True)
class Decoding:
    """What a detector's outputs mean beyond their shapes: the input size ``(H, W)`` that normalised boxes
    scale to, a pair's box format (None: the layout's own), the background class (never a detection) and the
    model's family as its exporter names it (which of two layouts of the same shapes it has)."""

    size: tuple[int, int]
    box_format: str | None = None
    background: int | None = None
    family: str | None = None  # what the exporter calls the model (a Hugging Face config's model_type)
    extra: int = 0  # an ultralytics output's rows after its class scores: mask coefficients (-seg), keypoints (-pose)
    protos: str | None = None  # an instance segmenter's prototype masks [N, E, h, w], the coefficients' partner


def _emit(model: onnx.ModelProto, b: Builder) -> None:
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.initializers)


def add_segment_scores(model: onnx.ModelProto, masks: str, types: Types, size: tuple[int, int],
                       threshold: float = 0.0) -> str:  # fmt: skip
    """``[N, K]`` = sum of class c's logits over a region of the ``[N, K, H, W]`` tensor ``masks``, per class c
    (pytorch-grad-cam's SemanticSegmentationTarget): the pixels predicted as c (argmax over K; for one class,
    the foreground: above ``threshold``), or the weights of the :data:`contract.REGION` input (``[N, H, W]`` at
    the input ``size``, resized to the masks' where they differ) where it is not negative, as its default
    ``[1, 1, 1]`` of -1 is. The region is data: the gradient flows through the logits only. Also
    :data:`contract.PIXEL_SHARES`, each class's share of the predicted pixels. Appended in place."""
    b = Builder(model, types, prefix="onnxcam/segment/")
    classes, dtype = b.shape(masks)[1], b.np_dtype(masks)
    predicted = b.op("ArgMax", masks, axis=1, keepdims=0)  # [N, H, W]
    off_on = b.const(np.asarray([0, 1], dtype=dtype))

    def onehot() -> str:  # [N, K, H, W], built in each branch: one built outside would be copied out of the If
        if classes == 1:  # one class: its foreground
            return b.op("Cast", b.op("Greater", masks, np.asarray(threshold, dtype)), to=b.elem_type(masks))
        return b.op("OneHot", predicted, classes, off_on, axis=1)

    shares = b.reduce("ReduceMean", onehot(), [2, 3], keepdims=0)
    b.op("Identity", shares, name=contract.PIXEL_SHARES)

    with b.subgraph() as predicted_nodes:  # the default, no pixel of the region given: one pass fewer
        predicted_mask = onehot()
    with b.subgraph() as region_nodes:
        region = b.unsqueeze(b.op("Cast", contract.REGION, to=b.elem_type(masks)), [1])  # [N, 1, H, W]
        if list(b.shape(masks)[2:]) != list(size):
            nothing = b.const(np.zeros(0, np.float32))  # (no roi, no scales: the sizes say it)
            sizes = b.op("Concat", b.dims(region, 0, 2), b.dims(masks, 2, 4), axis=0)
            region = b.op("Resize", region, nothing, nothing, sizes, mode="linear")
        weights = b.op("Where", b.op("Less", region, np.asarray(0, dtype)), onehot(), region)
    given = b.reduce("ReduceMax", contract.REGION, [0, 1, 2], keepdims=0)
    given = b.op("Not", b.op("Less", given, np.float32(0)))
    mask = b.fresh("pixel_weights")  # data, not differentiated: the gradient flows through the logits only
    b.if_(given, (region_nodes, weights), (predicted_nodes, predicted_mask), mask, b.elem_type(masks))
    # (shape inference cannot see through the If: the masks' shape)
    declared = helper.make_tensor_value_info(mask, b.elem_type(masks), None)
    declared.type.tensor_type.shape.CopyFrom(types[masks].shape)
    model.graph.value_info.append(declared)
    summed = b.reduce("ReduceSum", b.op("Mul", masks, mask), [2, 3], keepdims=0)
    b.op("Identity", summed, name=SEGMENT_SCORES)
    _emit(model, b)
    region_info = helper.make_tensor_value_info(contract.REGION, TensorProto.FLOAT, ["N", "H", "W"])
    region_info.type.tensor_type.shape.dim[0].CopyFrom(types[masks].shape.dim[0])  # the model's batch: 1, or named
    model.graph.input.append(region_info)
    model.graph.initializer.append(numpy_helper.from_array(np.full([1, 1, 1], -1, np.float32), contract.REGION))
    return SEGMENT_SCORES


def add_recognition_scores(model: onnx.ModelProto, steps: str, types: Types, blank: int) -> str:
    """CTC greedy decoding in the graph (as PaddleOCR's ``CTCLabelDecode``: the best symbol per step, repeats
    collapsed, blanks dropped) of the per-step scores ``steps`` ``[N, T, K]`` before their softmax over the K
    symbols, ``blank`` the CTC blank. Its ``[N, T]`` scores, one per character position j (0 beyond the decoded
    length): the sum of character j's softmax probability over the steps it was decoded from. Also
    :data:`contract.CHARACTERS` (each position's symbol, -1 beyond) and :data:`contract.CHARACTER_PROBABILITIES`
    (its probability at its first step, 0 beyond: the confidence PaddleOCR reports). Which steps make a character
    is data: the gradient flows through the probabilities only. Appended in place."""
    b = Builder(model, types, prefix="onnxcam/recognise/")
    _, count, classes = b.shape(steps)
    if not isinstance(count, int) or not isinstance(classes, int):
        raise OnnxcamError(f"the recogniser's steps and symbols are not fixed ({b.shape(steps)}): export it at a "
                           "fixed input width (--size)")  # fmt: skip
    if not 0 <= blank < classes:
        raise OnnxcamError(f"--background {blank} is not a symbol: the recogniser scores {classes} (0-{classes - 1})")
    probs = b.op("Softmax", steps, axis=2)
    best = b.op("ArgMax", steps, axis=2, keepdims=1)  # [N, T, 1]
    picked = b.op("Squeeze", b.op("GatherElements", probs, best, axis=2), b.ints([2]))  # [N, T]
    best = b.op("Squeeze", best, b.ints([2]))
    before = b.op("Pad", b.op("Slice", best, [0], [count - 1], [1]), b.ints([0, 1, 0, 0]), b.value(-1))
    kept = b.op("Not", b.op("Equal", best, b.value(blank)))
    first = b.op("And", kept, b.op("Not", b.op("Equal", best, before)))  # a character starts at this step
    position = b.op("Sub", b.op("CumSum", b.op("Cast", first, to=TensorProto.INT64), b.value(1)), b.value(1))
    positions = b.const(np.arange(count, dtype=np.int64).reshape(1, count, 1))
    member = b.op("And", b.op("Equal", b.unsqueeze(position, [1]), positions), b.unsqueeze(kept, [1]))  # [N, T, T]
    starts = b.op("And", member, b.unsqueeze(first, [1]))
    along = [b.op("Cast", m, to=b.elem_type(steps)) for m in (member, starts)]
    column = b.unsqueeze(picked, [2])  # [N, T, 1]: member [N, j, t] @ it = the sum over character j's steps
    summed = b.op("Squeeze", b.op("MatMul", along[0], column), b.ints([2]), name=RECOGNITION_SCORES)
    b.op("Squeeze", b.op("MatMul", along[1], column), b.ints([2]), name=contract.CHARACTER_PROBABILITIES)
    symbols = b.op("MatMul", b.op("Cast", starts, to=TensorProto.FLOAT),
                   b.op("Cast", b.unsqueeze(b.op("Add", best, b.value(1)), [2]), to=TensorProto.FLOAT))  # fmt: skip
    symbol = b.op("Sub", b.op("Cast", b.op("Squeeze", symbols, b.ints([2])), to=TensorProto.INT64), b.value(1))
    b.op("Identity", symbol, name=contract.CHARACTERS)  # (symbol + 1 at the start step, 0 elsewhere: -1 beyond)
    _emit(model, b)
    return summed


def add_similarity_scores(model: onnx.ModelProto, embedding: str, types: Types, scale: float | None = None) -> str:
    """``[N, R]`` cosine similarities of the image's embedding ``embedding`` ``[N, D]`` to each row of the
    :data:`contract.REFERENCES` input ``[R, D]`` (times ``scale``, an image-text model's logit scale, where given),
    and :data:`contract.EMBEDDINGS`, the embedding L2-normalised (a zero vector stays zero). The references are
    data: the gradient flows through the image's embedding only. Appended in place."""
    b = Builder(model, types, prefix="onnxcam/similarity/")
    dims = b.shape(embedding)[1]
    if not isinstance(dims, int):
        raise OnnxcamError(f"the embedding's size is not fixed ({b.shape(embedding)}); re-export the model")

    def unit(x: str) -> str:
        norm = b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", x, x), [1], keepdims=1))
        return b.op("Div", x, b.op("Max", norm, b.scalar(1e-12, embedding)))

    image = b.op("Identity", unit(embedding), name=contract.EMBEDDINGS)
    # (a broadcast product summed, not a MatMul: the references carry no batch axis, which the MatMul rule takes
    # any computed operand of the output's rank to have)
    pairs = b.op("Mul", b.unsqueeze(image, [1]), b.unsqueeze(unit(contract.REFERENCES), [0]))  # [N, R, D]
    cosines = b.reduce("ReduceSum", pairs, [2], keepdims=0)
    scaled = cosines if scale is None else b.op("Mul", cosines, b.scalar(scale, embedding))
    scores = b.op("Identity", scaled, name=SIMILARITY_SCORES)
    _emit(model, b)
    model.graph.input.append(helper.make_tensor_value_info(contract.REFERENCES, b.elem_type(embedding), ["R", dims]))
    zero = np.zeros((1, dims), b.np_dtype(embedding))  # (a default, as the region's: one zero vector, similarity 0)
    model.graph.initializer.append(numpy_helper.from_array(zero, contract.REFERENCES))
    return scores


def _slice(b: Builder, x: str, start: int, end: int, name: str | None = None) -> str:
    """``x[:, start:end]``, named ``name`` where given."""
    if name is None:
        return b.op("Slice", x, [start], [end], [1])
    b.op("Slice", x, [start], [end], [1], name=name)
    return name


def _ultralytics(b: Builder, raws: list[str], decoding: Decoding) -> None:
    """``[N, 4 + K + E, A]``: cx, cy, w, h, then the class scores (YOLOv8/v11/YOLOv5u), then E values that are no
    classes (``decoding.extra``: an instance segmenter's mask coefficients, a pose model's keypoints)."""
    (raw,) = raws
    _slice(b, raw, 0, 4, BOXES_XYWH)
    rows = b.shape(raw)[1]
    _slice(b, raw, 4, rows - decoding.extra, CLASS_SCORES)
    if decoding.extra:
        _slice(b, raw, rows - decoding.extra, rows, EXTRA_ROWS)


def _yolov5(b: Builder, raws: list[str], decoding: Decoding) -> None:
    """``[N, A, 5 + K]``: cx, cy, w, h, objectness, then class probabilities; a box's class score is
    objectness x class probability, as YOLOv5's ``non_max_suppression`` ranks and thresholds it."""
    (raw,) = raws
    channels = b.op("Transpose", raw, perm=[0, 2, 1])  # [N, 5 + K, A]
    _slice(b, channels, 0, 4, BOXES_XYWH)
    objectness, classes = _slice(b, channels, 4, 5), _slice(b, channels, 5, b.shape(raw)[2])
    b.op("Mul", classes, objectness, name=CLASS_SCORES)


def _pair_boxes(b: Builder, boxes: str, to_xywh: np.ndarray) -> None:
    """BOXES_XYWH ``[N, 4, A]`` from boxes ``[N, A, 4]``: ``boxes @ to_xywh`` is cx, cy, w, h in input pixels."""
    xywh = b.op("MatMul", boxes, b.const(to_xywh.astype(b.np_dtype(boxes))))
    b.op("Transpose", xywh, name=BOXES_XYWH, perm=[0, 2, 1])


def _ssd(b: Builder, raws: list[str], decoding: Decoding) -> None:
    """Scores ``[N, A, K]`` as the model outputs them and decoded boxes ``[N, A, 4]`` in input pixels (x1, y1, x2,
    y2 as torchvision's box coder decodes them, or cx, cy, w, h): SSD, RetinaNet, FCOS before their NMS."""
    scores, boxes = raws
    b.op("Transpose", scores, name=CLASS_SCORES, perm=[0, 2, 1])
    _pair_boxes(b, boxes, BOX_FORMATS[decoding.box_format or "xyxy"])


def _detr(b: Builder, raws: list[str], decoding: Decoding) -> None:
    """Logits ``[N, Q, K + 1]`` and boxes ``[N, Q, 4]`` cx, cy, w, h normalised to the input: a query's class
    score is its softmax over K + 1 with the last (no-object) column dropped, as DETR's PostProcess scores it."""
    logits, boxes = raws
    classes = b.shape(logits)[2] - 1
    probabilities = b.op("Softmax", logits, axis=2)
    real = b.op("Slice", probabilities, b.ints([0]), b.ints([classes]), b.ints([2]))
    b.op("Transpose", real, name=CLASS_SCORES, perm=[0, 2, 1])
    height, width = decoding.size
    _pair_boxes(b, boxes, np.diag([width, height, width, height]).astype(float))


def _detr_sigmoid(b: Builder, raws: list[str], decoding: Decoding) -> None:
    """Logits ``[N, Q, K]`` and boxes ``[N, Q, 4]`` cx, cy, w, h normalised to the input: each (query, class)
    pair's score is the sigmoid of its logit, as RT-DETR's and Conditional DETR's post-processing rank them."""
    logits, boxes = raws
    b.op("Transpose", b.op("Sigmoid", logits), name=CLASS_SCORES, perm=[0, 2, 1])
    height, width = decoding.size
    _pair_boxes(b, boxes, np.diag([width, height, width, height]).astype(float))


@dataclass(frozen=True)
class DetectorLayout:
    """A detector's raw output layout: which shapes have it, its class count, how to split it, how to say it."""

    fits: Callable[[list[list[int]]], bool]  # the shapes of its outputs, each [N, d1, d2], d1 and d2 known
    classes: Callable[[list[list[int]]], int]
    split: Callable[[Builder, list[str], Decoding], None]  # emits BOXES_XYWH [N, 4, A] and CLASS_SCORES [N, K, A]
    described: str
    anchor_axis: int  # which axis of the (first) raw output runs over the anchors
    outputs: int = 1  # a pair reads class scores and boxes [N, A, 4], in this order
    names: frozenset[str] = frozenset()  # output names that tell it from another layout of the same shapes
    nms: bool = True  # False: a set predictor, whose detections need no suppression
    box_formats: tuple[str, ...] = ()  # the box formats --box-format may give, the first by default
    explained: str | None = None  # what its class scores are where the layout fixes it (one of contract.SCORES)
    pyramid: bool = False  # its anchors must be the cells of a feature pyramid at the input size (YOLO heads)
    families: frozenset[str] = frozenset()  # the exporters' names of models with this layout (HF's model_type)
    every_class: bool = False  # each (anchor, class) pair is a detection, not an anchor's best class alone
    extra_rows: bool = False  # rows after its class scores may be no classes (Decoding.extra: ultralytics -seg, -pose)


def class_count(name: str, shapes: list[list[int]], decoding: Decoding) -> int:
    """The classes that layout ``name`` reads from outputs of ``shapes``: its rows but ``decoding.extra``."""
    layout = DETECTOR_LAYOUTS[name]
    return layout.classes(shapes) - (decoding.extra if layout.extra_rows else 0)


def pyramid_cells(anchors: int, size: tuple[int, int]) -> bool:
    """Whether ``anchors`` is the cell count of a feature pyramid at input ``size``: 1 or 3 anchors per cell over
    consecutive strides (2 to 128, each side halved rounding up, as stride-2 convolutions do). A YOLO head's
    anchors are (YOLOv8 at 640: 80x80 + 40x40 + 20x20 = 8400); a feature tensor's ``[N, 1024, 8]`` is not."""
    sides, grids = list(size), []
    for _ in range(7):
        sides = [-(-v // 2) for v in sides]
        grids.append(sides[0] * sides[1])
    sums = {sum(grids[i:j]) for i in range(len(grids)) for j in range(i + 1, len(grids) + 1)}
    return any(anchors % m == 0 and anchors // m in sums for m in (1, 3))


def _pair(s: list[list[int]]) -> bool:
    """Class scores ``[N, A, k]`` and boxes ``[N, A, 4]``."""
    return s[0][1] == s[1][1] and s[1][2] == 4


DETECTOR_LAYOUTS = {
    "ultralytics": DetectorLayout(lambda s: 4 < s[0][1] < s[0][2], lambda s: s[0][1] - 4, _ultralytics,
                                  "an ultralytics detector's output (cx, cy, w, h and K class scores per anchor)", 2,
                                  pyramid=True, extra_rows=True),
    "yolov5": DetectorLayout(lambda s: 5 < s[0][2] < s[0][1], lambda s: s[0][2] - 5, _yolov5,
                             "a YOLOv5 detector's output (cx, cy, w, h, objectness and K class probabilities per "
                             "anchor; a box's class score is objectness x class probability)", 1, pyramid=True),
    "detr": DetectorLayout(lambda s: _pair(s) and s[0][2] >= 2 and s[0][1] <= MAX_QUERIES, lambda s: s[0][2] - 1,
                           _detr, "a DETR detector's logits and boxes (per query K + 1 class logits, the last "
                           "no-object, and cx, cy, w, h normalised to the input; a box's class score is its softmax "
                           "probability, no suppression)", 1, 2, frozenset({"pred_logits"}), nms=False,
                           explained="probability", families=frozenset({"detr", "yolos", "table-transformer"})),
    "detr-sigmoid": DetectorLayout(
        lambda s: _pair(s) and s[0][1] <= MAX_QUERIES, lambda s: s[0][2], _detr_sigmoid,
        "a DETR-family detector's logits and boxes scored by sigmoids (per query K class logits and cx, cy, w, h "
        "normalised to the input; each query and class a detection by its sigmoid probability, no suppression: "
        "RT-DETR, RF-DETR, Conditional and Deformable DETR)", 1, 2, frozenset({"dets"}), nms=False,
        explained="probability", every_class=True,
        families=frozenset({"rt_detr", "rt_detr_v2", "conditional_detr", "deformable_detr", "dab-detr", "d_fine",
                            "deta"})),
    "ssd": DetectorLayout(_pair, lambda s: s[0][2], _ssd,
                          "an SSD/RetinaNet detector's class scores and decoded boxes (per anchor K class scores "
                          "and a box in input pixels)", 1, 2, frozenset({"scores", "boxes", "bboxes"}),
                          box_formats=tuple(BOX_FORMATS)),
}  # fmt: skip


def _known(shape: list[int | None] | None) -> bool:
    return bool(shape) and len(shape) == 3 and all(isinstance(d, int) for d in shape[1:])


def detector_layout(
    shapes: dict[str, list[int | None]], first: str, outputs: list[str], forced: str | None = None,
    size: tuple[int, int] | None = None, family: str | None = None,
) -> tuple[str, list[str]] | None:  # fmt: skip
    """The :data:`DETECTOR_LAYOUTS` entry (``forced``: only that one is tried) that the model has, and the
    tensors it reads; None for none. A single-output layout reads ``first``; a pair, two of the graph's
    ``outputs`` over the same anchors, the boxes' last axis 4. Unless forced, a YOLO layout's anchors must be a
    feature pyramid's cells at the input ``size`` (:func:`pyramid_cells`). Of the layouts that fit, one that knows an
    output's name (DETR's ``pred_logits``) wins, then a pair (stronger evidence than one output's shape: DETR's
    ``[N, 100, 92]`` logits alone would fit YOLOv5's), then the first in :data:`DETECTOR_LAYOUTS`; the layouts
    that list the model's ``family`` (its exporter's name for it) go before all others. DETR's softmax and the
    sigmoid DETRs have the same shapes: where neither a name nor the family tells them apart, refused."""
    known = [o for o in outputs if _known(shapes.get(o))]
    found: list[tuple[str, list[str]]] = []
    for name, layout in DETECTOR_LAYOUTS.items():
        if forced not in (None, name):
            continue
        if layout.outputs == 1:
            reads = [[first]] if _known(shapes.get(first)) else []
        else:
            reads = [[s, x] for s in known for x in known if s != x]
        found += [(name, read) for read in reads if layout.fits([shapes[t] for t in read])
                  and (forced or not layout.pyramid or size is None
                       or pyramid_cells(shapes[read[0]][layout.anchor_axis], size))]  # fmt: skip
    named = [f for f in found if family in DETECTOR_LAYOUTS[f[0]].families]
    found = named or found
    found.sort(key=lambda f: (not DETECTOR_LAYOUTS[f[0]].names.intersection(f[1]), len(f[1]) == 1))  # (stable)
    if not found:
        return None
    best, reads = found[0]
    unnamed = not named and not forced and not DETECTOR_LAYOUTS[best].names.intersection(reads)
    if unnamed and any({name, best} == {"detr", "detr-sigmoid"} and read == reads for name, read in found[1:]):
        outputs = " and ".join(f"{r!r} {shapes[r]}" for r in reads)
        raise OnnxcamError(
            f"{outputs} fit two detectors: DETR's softmax over K + 1 classes (the last no-object) and the sigmoid "
            "scores of RT-DETR, Conditional or Deformable DETR, and nothing in the file says which: keep the "
            "exporter's config.json beside it, or give --detector-layout detr or detr-sigmoid"
        )
    return found[0]


def add_detector_split(model: onnx.ModelProto, raws: list[str], types: Types, layout: str, decoding: Decoding) -> Task:
    """Cut the raw outputs into class scores ``[N, K, A]`` (named :data:`CLASS_SCORES`, the logits) and
    boxes ``[N, 4, A]`` cx, cy, w, h in input pixels, per its ``layout``; with a background class, the scores
    the NMS ranks (:data:`RANKED_SCORES`) hold that column below any score. Appended in place."""
    b = Builder(model, types, prefix="onnxcam/detect/")
    found = DETECTOR_LAYOUTS[layout]
    found.split(b, raws, decoding)
    ranked = contract.LOGITS  # (the graft's name for CLASS_SCORES)
    if decoding.background is not None:
        classes = class_count(layout, [b.shape(r) for r in raws], decoding)
        column = b.const((np.arange(classes) == decoding.background).reshape(1, classes, 1))
        lowest = b.const(np.asarray(np.finfo(np.float32).min, b.np_dtype(raws[0])))  # finite: 0 x it stays 0
        ranked = RANKED_SCORES
        b.op("Where", column, lowest, CLASS_SCORES, name=ranked)
    _emit(model, b)
    return Task("detection", BOXES_XYWH, found.anchor_axis, ranked, found.nms, found.explained,
                every_class=found.every_class,
                protos=decoding.protos if found.extra_rows else None)


# -- in the grafted graph: a detector's target rows ---------------------------------------------------
def detection_targets(b: Builder, scores: str, boxes: str, every_class: bool = False) -> tuple[str, str]:
    """A detector's target rows as flat indices class * A + anchor ``[N, T]`` into ``scores`` and whether each
    is a detection (``valid``: false for a k-th kept detection that does not exist); emits the outputs
    ``target_classes``, ``boxes``, ``box_scores``, ``box_anchors`` (see :mod:`onnxcam.contract`).

    ``scores`` ``[N, K, A]`` class scores, ``boxes`` ``[N, 4, A]`` cx, cy, w, h. Kept detections:
    each anchor scored by its best class (``every_class``: each of its classes), NonMaxSuppression per class
    above ``conf_threshold`` with ``iou_threshold``, ranked by score (TopK over the kept ``[N, K * A]`` scores).
    """
    _, classes, anchors = b.shape(scores)
    total = classes * anchors
    lowest = b.scalar(-np.inf, scores)
    best = b.op("ArgMax", scores, axis=1, keepdims=1)  # [N, 1, A]
    is_best = b.op("Equal", best, b.const(np.arange(classes, dtype=np.int64).reshape(1, classes, 1)))
    candidates = scores if every_class else b.op("Where", is_best, scores, lowest)  # [N, K, A]
    xywh = b.op("Transpose", boxes, perm=[0, 2, 1])  # [N, A, 4]
    rows = _deepest_rank(b)  # no class needs more than k kept boxes for the k-th overall
    as_float = [b.op("Cast", x, to=TensorProto.FLOAT) for x in (xywh, candidates)]  # NMS takes float32 only
    thresholds = [b.unsqueeze(name, [0]) for name in (contract.IOU_THRESHOLD, contract.CONF_THRESHOLD)]
    selected = b.op("NonMaxSuppression", *as_float, rows, *thresholds, center_point_box=1)  # [M, 3] n, class, anchor
    kept = b.op("ScatterND", b.op("Expand", lowest, b.op("Shape", scores)), selected,
                b.op("GatherND", candidates, selected))  # fmt: skip
    flat_shape = b.op("Concat", b.dims(scores, 0, 1), b.ints([total]), axis=0)
    ranked_scores, ranked = b.op_multi("TopK", b.op("Reshape", kept, flat_shape), _clamp(b, rows, total),
                                       outputs=2, axis=1, largest=1, sorted=1)  # fmt: skip
    zero, one = b.value(0), b.value(1)
    negative = b.op("Less", contract.TARGETS, zero)
    rank = b.op("Where", negative, b.op("Sub", b.op("Neg", contract.TARGETS), one), zero)  # -k -> k-1
    rank = _clamp(b, rank, total, inclusive=False)
    flat = b.op("Where", negative, b.op("GatherElements", ranked, rank, axis=1), contract.TARGETS)
    flat = _clamp(b, flat, total, inclusive=False)  # (a code beyond K * A: the last anchor's last class)
    found = b.op("Greater", b.op("GatherElements", ranked_scores, rank, axis=1), lowest)
    valid = b.op("Or", b.op("Not", negative), found)  # [N, T]
    _emit_detections(b, scores, xywh, flat, valid, anchors)
    return flat, valid


def detection_seed(b: Builder, scores: str, flat: str, valid: str) -> str:
    """The seed ``[N, T, K, A]`` of the target rows :func:`detection_targets` resolved: one-hot at each valid one."""
    _, classes, anchors = b.shape(scores)
    onehot = b.op("OneHot", flat, classes * anchors, np.asarray([0, 1], b.np_dtype(scores)), axis=-1)
    seed = b.op("Mul", onehot, b.unsqueeze(b.op("Cast", valid, to=b.elem_type(scores)), [2]))
    return b.op("Reshape", seed, b.op("Concat", b.dims(contract.TARGETS, 0, 2), b.ints([classes, anchors]), axis=0))


def _deepest_rank(b: Builder) -> str:
    """max(T, the largest k of the -k targets), int64 [1]: how many kept detections the rows need."""
    flat = b.op("Reshape", contract.TARGETS, b.ints([-1]))
    wanted = b.op("Concat", b.op("Neg", flat), b.ints([0]), axis=0)  # (never empty, even for an empty batch)
    deepest = b.op_multi("TopK", wanted, b.ints([1]), outputs=2, axis=0)[0]
    rows = b.dims(contract.TARGETS, 1, 2)
    return b.op("Where", b.op("Greater", deepest, rows), deepest, rows)


def _clamp(b: Builder, x: str, limit: int, inclusive: bool = True) -> str:
    """``min(x, limit)`` (or ``limit - 1``) for int64 ``x`` (Where, not Min: int64 Min needs opset 12)."""
    bound = b.value(limit if inclusive else limit - 1)
    return b.op("Where", b.op("Less", x, bound), x, bound)


def _emit_detections(b: Builder, scores: str, xywh: str, flat: str, valid: str, anchors: int) -> None:
    """target_classes, box_anchors (-1 where not ``valid``), box_scores and boxes (zero there) of flat indices
    ``flat`` = class * A + anchor ``[N, T]``."""
    count, missing = b.value(anchors), b.value(-1)
    for output, value in ((contract.TARGET_CLASSES, b.op("Div", flat, count)), (contract.BOX_ANCHORS,
                          b.op("Mod", flat, count))):  # fmt: skip
        b.op("Where", valid, value, missing, name=output)
    on = b.op("Cast", valid, to=b.elem_type(scores))
    flat_scores = b.op("Reshape", scores, b.op("Concat", b.dims(scores, 0, 1), b.ints([-1]), axis=0))
    picked = b.op("GatherElements", flat_scores, flat, axis=1)
    b.op("Mul", picked, on, name=contract.BOX_SCORES)
    xyxy = b.op("MatMul", xywh, b.const(XYWH_TO_XYXY.astype(b.np_dtype(scores))))  # [N, A, 4]
    index = b.unsqueeze(b.op("Mod", flat, count), [2])  # [N, T, 1]
    index = b.op("Expand", index, b.op("Concat", b.op("Shape", flat), b.ints([4]), axis=0))
    box = b.op("GatherElements", xyxy, index, axis=1)  # [N, T, 4]
    b.op("Mul", box, b.unsqueeze(on, [2]), name=contract.BOXES)


def instance_masks(b: Builder, protos: str, flat: str, valid: str) -> None:
    """``instance_masks`` ``[N, T, h, w]``: each target row's mask logits at the prototypes' resolution, its box's
    coefficients (:data:`EXTRA_ROWS`) times the prototypes ``protos`` ``[N, E, h, w]`` (zero on rows that are not a
    detection). Its mask, as ultralytics' ``process_mask`` with ``upsample``: the logits upsampled bilinearly to
    the input, above 0, inside its box (:func:`onnxcam.api.instance_mask`). Data, not differentiated."""
    height, width = b.shape(protos)[2:]
    anchor = b.op("Mod", flat, b.value(b.shape(EXTRA_ROWS)[2]))  # [N, T]
    index = b.op("Expand", b.unsqueeze(anchor, [1]), b.op("Concat", b.dims(EXTRA_ROWS, 0, 2), b.dims(flat, 1, 2),
                                                             axis=0))  # fmt: skip
    coefficients = b.op("Transpose", b.op("GatherElements", EXTRA_ROWS, index, axis=2), perm=[0, 2, 1])  # [N, T, E]
    planes = b.op("Reshape", protos, b.op("Concat", b.dims(protos, 0, 2), b.ints([height * width]), axis=0))
    logits = b.op("Reshape", b.op("MatMul", coefficients, planes),
                  b.op("Concat", b.dims(flat, 0, 2), b.ints([height, width]), axis=0))  # fmt: skip
    on = b.op("Cast", b.unsqueeze(valid, [2, 3]), to=b.elem_type(protos))
    b.op("Mul", logits, on, name=contract.INSTANCE_MASKS)


def add_detection_io(graph: onnx.GraphProto, b: Builder, nms: bool = True) -> None:
    """The threshold inputs (with ultralytics' defaults) and the detection outputs of :func:`detection_seed`.
    Without ``nms`` (a set predictor), ``iou_threshold`` is the constant 1: no box is suppressed, and no input."""
    elem, batch = b.elem_type(contract.LOGITS), b.shape(contract.LOGITS)[0] or "N"
    for name, value in contract.DEFAULT_THRESHOLDS.items():  # float32, as NonMaxSuppression takes them
        constant = not nms and name == contract.IOU_THRESHOLD
        if not constant:
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
        graph.initializer.append(numpy_helper.from_array(np.asarray(1.0 if constant else value, np.float32), name))
    info = helper.make_tensor_value_info
    graph.output.extend([
        info(contract.BOXES, elem, [batch, "T", 4]),
        info(contract.BOX_SCORES, elem, [batch, "T"]),
        info(contract.BOX_ANCHORS, TensorProto.INT64, [batch, "T"]),
    ])  # fmt: skip
