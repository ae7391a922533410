"""What a target row explains beyond a classifier's class logit: segmenters and detectors.

A task is data for the grafter (:func:`onnxcam_export.graft.graft`): a segmenter becomes a
classifier whose logits are computed in the graph from its masks, so everything downstream is
the classifier's; a detector keeps its class scores ``[N, K, A]`` as the logits and resolves its
target rows (``(anchor, class)``, or the k-th detection kept by non-maximum suppression) in the
graph, with default-domain ops only (see :mod:`onnxcam.contract`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcam import contract
from onnxcam_export.builder import Builder, Types

SEGMENT_SCORES = "onnxcam/segment_scores"
CLASS_SCORES = "onnxcam/class_scores"
BOXES_XYWH = "onnxcam/boxes_xywh"
# (cx, cy, w, h) @ XYWH_TO_XYXY = (cx - w/2, cy - h/2, cx + w/2, cy + h/2)
XYWH_TO_XYXY = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]])


@dataclass(frozen=True)
class Task:
    """The model's task (one of :data:`contract.TASKS`); a detector's ``boxes`` tensor is ``[N, 4, A]`` cx, cy, w, h."""

    kind: str = "classification"
    boxes: str | None = None
    anchor_axis: int = 2  # a detector's: the axis of its raw output that runs over the anchors


def _emit(model: onnx.ModelProto, b: Builder) -> None:
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.initializers)


def add_segment_scores(model: onnx.ModelProto, masks: str, types: Types) -> str:
    """``[N, K]`` = sum over the pixels predicted as class c (argmax over K) of class c's logits, for
    the ``[N, K, H, W]`` tensor ``masks`` (pytorch-grad-cam's SemanticSegmentationTarget). The
    prediction is an integer mask: the gradient flows through the logits only. Appended in place."""
    b = Builder(model, types, prefix="onnxcam/segment/")
    classes = b.shape(masks)[1]
    predicted = b.op("ArgMax", masks, axis=1, keepdims=0)  # [N, H, W]
    off_on = b.const(np.asarray([0, 1], dtype=b.np_dtype(masks)))
    mask = b.op("OneHot", predicted, b.const(np.asarray(classes, np.int64)), off_on, axis=1)  # [N, K, H, W]
    summed = b.reduce("ReduceSum", b.op("Mul", masks, mask), [2, 3], keepdims=0)
    b.nodes.append(helper.make_node("Identity", [summed], [SEGMENT_SCORES], name=SEGMENT_SCORES))
    _emit(model, b)
    return SEGMENT_SCORES


def _slice(b: Builder, x: str, start: int, end: int, name: str | None = None) -> str:
    """``x[:, start:end]``, named ``name`` where given."""
    if name is None:
        return b.op("Slice", x, b.ints([start]), b.ints([end]), b.ints([1]))
    b.nodes.append(helper.make_node("Slice", [x, b.ints([start]), b.ints([end]), b.ints([1])], [name], name=name))
    return name


def _ultralytics(b: Builder, raw: str) -> None:
    """``[N, 4 + K, A]``: cx, cy, w, h, then the class scores (YOLOv8/v11/YOLOv5u)."""
    _slice(b, raw, 0, 4, BOXES_XYWH)
    _slice(b, raw, 4, b.shape(raw)[1], CLASS_SCORES)


def _yolov5(b: Builder, raw: str) -> None:
    """``[N, A, 5 + K]``: cx, cy, w, h, objectness, then class probabilities; a box's class score is
    objectness x class probability, as YOLOv5's ``non_max_suppression`` ranks and thresholds it."""
    channels = b.op("Transpose", raw, perm=[0, 2, 1])  # [N, 5 + K, A]
    _slice(b, channels, 0, 4, BOXES_XYWH)
    objectness, classes = _slice(b, channels, 4, 5), _slice(b, channels, 5, b.shape(raw)[2])
    b.nodes.append(helper.make_node("Mul", [classes, objectness], [CLASS_SCORES], name=CLASS_SCORES))


@dataclass(frozen=True)
class DetectorLayout:
    """A detector's raw output layout: which shapes have it, its class count, how to split it, how to say it."""

    fits: Callable[[list[int]], bool]  # [N, d1, d2], d1 and d2 known
    classes: Callable[[list[int]], int]
    split: Callable[[Builder, str], None]  # emits BOXES_XYWH [N, 4, A] and CLASS_SCORES [N, K, A]
    described: str
    anchor_axis: int  # which axis of the raw output runs over the anchors


DETECTOR_LAYOUTS = {
    "ultralytics": DetectorLayout(lambda s: 4 < s[1] < s[2], lambda s: s[1] - 4, _ultralytics,
                                  "an ultralytics detector's output (cx, cy, w, h and K class scores per anchor)", 2),
    "yolov5": DetectorLayout(lambda s: 5 < s[2] < s[1], lambda s: s[2] - 5, _yolov5,
                             "a YOLOv5 detector's output (cx, cy, w, h, objectness and K class probabilities per "
                             "anchor; a box's class score is objectness x class probability)", 1),
}  # fmt: skip


def detector_layout(shape: list[int | None] | None) -> str | None:
    """The :data:`DETECTOR_LAYOUTS` entry a raw output of ``shape`` has, if any."""
    if not shape or len(shape) != 3 or not all(isinstance(d, int) for d in shape[1:]):
        return None
    return next((name for name, layout in DETECTOR_LAYOUTS.items() if layout.fits(shape)), None)


def add_detector_split(model: onnx.ModelProto, raw: str, types: Types, layout: str) -> Task:
    """Cut the raw output into class scores ``[N, K, A]`` (named :data:`CLASS_SCORES`, the logits) and
    boxes ``[N, 4, A]`` cx, cy, w, h, per its ``layout``. Appended in place."""
    b = Builder(model, types, prefix="onnxcam/detect/")
    DETECTOR_LAYOUTS[layout].split(b, raw)
    _emit(model, b)
    return Task("detection", BOXES_XYWH, DETECTOR_LAYOUTS[layout].anchor_axis)


# -- in the grafted graph: a detector's target rows ---------------------------------------------------
def detection_targets(b: Builder, scores: str, boxes: str) -> tuple[str, str]:
    """A detector's target rows as flat indices class * A + anchor ``[N, T]`` into ``scores`` and whether each
    is a detection (``valid``: false for a k-th kept detection that does not exist); emits the outputs
    ``target_classes``, ``boxes``, ``box_scores``, ``box_anchors`` (see :mod:`onnxcam.contract`).

    ``scores`` ``[N, K, A]`` class scores, ``boxes`` ``[N, 4, A]`` cx, cy, w, h. Kept detections:
    each anchor scored by its best class, NonMaxSuppression per class above ``conf_threshold``
    with ``iou_threshold``, ranked by score (TopK over the kept ``[N, K * A]`` scores).
    """
    _, classes, anchors = b.shape(scores)
    total = classes * anchors
    lowest = b.scalar(-np.inf, scores)
    best = b.op("ArgMax", scores, axis=1, keepdims=1)  # [N, 1, A]
    is_best = b.op("Equal", best, b.const(np.arange(classes, dtype=np.int64).reshape(1, classes, 1)))
    candidates = b.op("Where", is_best, scores, lowest)  # [N, K, A]: only each anchor's best class
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
    zero, one = b.const(np.asarray(0, np.int64)), b.const(np.asarray(1, np.int64))
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
    onehot = b.op("OneHot", flat, b.const(np.asarray(classes * anchors, np.int64)),
                  b.const(np.asarray([0, 1], dtype=b.np_dtype(scores))), axis=-1)  # fmt: skip
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
    bound = b.const(np.asarray(limit if inclusive else limit - 1, np.int64))
    return b.op("Where", b.op("Less", x, bound), x, bound)


def _emit_detections(b: Builder, scores: str, xywh: str, flat: str, valid: str, anchors: int) -> None:
    """target_classes, box_anchors (-1 where not ``valid``), box_scores and boxes (zero there) of flat indices
    ``flat`` = class * A + anchor ``[N, T]``."""
    count = b.const(np.asarray(anchors, np.int64))
    missing = b.const(np.asarray(-1, np.int64))
    for output, value in ((contract.TARGET_CLASSES, b.op("Div", flat, count)), (contract.BOX_ANCHORS,
                          b.op("Mod", flat, count))):  # fmt: skip
        b.nodes.append(helper.make_node("Where", [valid, value, missing], [output], name=output))
    on = b.op("Cast", valid, to=b.elem_type(scores))
    flat_scores = b.op("Reshape", scores, b.op("Concat", b.dims(scores, 0, 1), b.ints([-1]), axis=0))
    picked = b.op("GatherElements", flat_scores, flat, axis=1)
    b.nodes.append(helper.make_node("Mul", [picked, on], [contract.BOX_SCORES], name=contract.BOX_SCORES))
    xyxy = b.op("MatMul", xywh, b.const(XYWH_TO_XYXY.astype(b.np_dtype(scores))))  # [N, A, 4]
    index = b.unsqueeze(b.op("Mod", flat, count), [2])  # [N, T, 1]
    index = b.op("Expand", index, b.op("Concat", b.op("Shape", flat), b.ints([4]), axis=0))
    box = b.op("GatherElements", xyxy, index, axis=1)  # [N, T, 4]
    b.nodes.append(helper.make_node("Mul", [box, b.unsqueeze(on, [2])], [contract.BOXES], name=contract.BOXES))


def add_detection_io(graph: onnx.GraphProto, b: Builder) -> None:
    """The threshold inputs (with ultralytics' defaults) and the detection outputs of :func:`detection_seed`."""
    elem, batch = b.elem_type(contract.LOGITS), b.shape(contract.LOGITS)[0] or "N"
    for name, value in contract.DEFAULT_THRESHOLDS.items():  # float32, as NonMaxSuppression takes them
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
    info = helper.make_tensor_value_info
    graph.output.extend([
        info(contract.BOXES, elem, [batch, "T", 4]),
        info(contract.BOX_SCORES, elem, [batch, "T"]),
        info(contract.BOX_ANCHORS, TensorProto.INT64, [batch, "T"]),
    ])  # fmt: skip
