"""``onnxcam export --from``: give a user's ONNX classifier the onnxcam contract (``onnx`` only, no torch).

Steps: pick the logits (the input of a final Softmax/LogSoftmax, flattened to ``[N, K]``),
raise the opset if a gradient rule needs a newer op form, pick the target layer, put the
preprocessing (uint8 RGB ``[N, H, W, 3]`` -> the model's float input) in front of the graph,
graft the gradients and store the model card.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
from onnx import TensorProto, helper, numpy_helper

from onnxcam import contract
from onnxcam.contract import MAX_INPUT_SIDE, SCORES, TASKS, ModelCard, imagenet_labels
from onnxcam.errors import OnnxcamError
from onnxcam.geometry import Resize
from onnxcam.methods import in_graph
from onnxcam.outputs import atomic_write, file_digest
from onnxcam_export import image_text, probe
from onnxcam_export.builder import Types, infer_types, make_node
from onnxcam_export.graft import graft, graft_gradient_free, rename_tensor
from onnxcam_export.layouts import Layout, infer_layouts
from onnxcam_export.ops import ops_with
from onnxcam_export.probe import annotate_shapes, fold_shape_computations
from onnxcam_export.save import save_explainer
from onnxcam_export.sources import ASSUMED, DEFAULTS, RESIZES, Facts, from_file, labels_file, preprocess_file
from onnxcam_export.tasks import (
    BOX_FORMATS,
    CLASS_SCORES,
    DETECTOR_LAYOUTS,
    Decoding,
    Task,
    add_detector_split,
    add_recognition_scores,
    add_segment_scores,
    add_similarity_scores,
    class_count,
    detector_layout,
)
from onnxcam_export.vjp import RULES, UnsupportedOp
from onnxcam_export.walk import FLOATS, head_nodes, inputs_of, shape_only_tensors

MIN_OPSET = 11  # TopK with a K input, GatherElements, ScatterElements
SOFTMAX, PASS_THROUGH, STEP_BACK = ops_with("softmax"), ops_with("reshaping"), ops_with("step_back")


@dataclass(frozen=True)
class Preprocessing:
    """What the user said about the preprocessing (flags, ``--preprocess``), before the file's own facts."""

    given: Facts = field(default_factory=Facts)

    @classmethod
    def from_json(cls, path: Path) -> Preprocessing:
        """A ``--preprocess`` file: onnxcam's JSON, a timm ``pretrained_cfg`` or HF's ``preprocessor_config.json``."""
        return cls.create(None, None, None, False, str(path))

    @classmethod
    def create(
        cls, size: tuple[int, int] | None, mean: object, std: object, bgr: bool, preprocess: str | None = None,
        resize: str | None = None,
    ) -> Preprocessing:  # fmt: skip
        """From the flags (None, False: not given) and a ``--preprocess`` preset or file, which the flags override;
        ``resize``: a :data:`RESIZES` name."""
        facts = Facts()
        if resize is not None:
            if resize not in RESIZES:
                raise OnnxcamError(f"unknown --resize {resize!r}; choose one of: {', '.join(RESIZES)}")
            facts.add(f"flag --resize {resize}", resize=resize)
        for key, value in (("mean", mean), ("std", std)):
            if value is None:
                continue
            value = tuple(float(v) for v in value)
            if len(value) != 3 or not all(math.isfinite(v) for v in value) or (key == "std" and min(value) <= 0):
                raise OnnxcamError(f"{key} needs three finite values (std > 0) on the 0..1 scale, got {value}")
            facts.add(f"flag --{key}", **{key: value})
        if size is not None:
            if len(size) != 2 or min(size) < 1 or max(size) > MAX_INPUT_SIDE:
                raise OnnxcamError(f"--size needs a height and width from 1 to {MAX_INPUT_SIDE}, got {size}")
            facts.add("flag --size", size=tuple(size))
        if bgr:
            facts.add("flag --bgr", bgr=True)
        facts = facts.merge(preprocess_file(preprocess)) if preprocess else facts
        if {"mean", "std"} & set(facts.values) and facts.sources.get("mean", "").startswith("flag"):
            facts.add("flag --mean/--std (RGB order; no --bgr)", bgr=False)  # the flags name RGB channels
        return cls(facts)


@dataclass(frozen=True)
class Resolved:
    """The preprocessing the graft builds in, each fact with where it came from (the card's ``sources``)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool
    resize: Resize
    sources: dict[str, str]


Shapes = dict[str, list[int | str | None]]  # tensor name -> dims: size, symbolic name or None


def _shapes(types: Types) -> Shapes:
    return {
        name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        for name, t in types.items()
        if t.HasField("shape")
    }


def candidate_layers(graph: onnx.GraphProto, logits: str, layouts: dict[str, Layout], types: Types) -> list[str]:
    """Tensors with a spatial grid (h, w >= 2, any :mod:`layouts` layout) that every differentiable path from the
    model's input to the logits crosses, in graph order.

    One pass in each direction, linear in the graph's size: a tensor T is such a cut when, right after the node
    that makes it, it is the only float tensor still to be read on the way to the logits (read by a node with a
    float output that leads there; what the shapes alone compute, and integer tensors, do not count).
    """
    static = shape_only_tensors(graph)  # (no gradient flows through what the shapes alone compute)
    nodes = list(graph.node)

    def floating(name: str) -> bool:
        return bool(name) and name not in static and (name not in types or types[name].elem_type in FLOATS)

    needed = {logits}
    last = {logits: len(nodes)}  # tensor -> index of the last node on the way to the logits that reads it
    for i in reversed(range(len(nodes))):
        node = nodes[i]
        if needed.intersection(node.output):
            reads = inputs_of(node)
            needed.update(reads)
            if any(floating(o) for o in node.output):
                for name in reads:
                    if floating(name):
                        last.setdefault(name, i)
    made = {o: i for i, n in enumerate(nodes) for o in n.output}
    opens = Counter(made.get(name, -1) for name in last)  # (a graph input is read from the start)
    closes = Counter(last.values())
    live, found = opens[-1], []
    for i, node in enumerate(nodes):
        live += opens[i] - closes[i]
        found += [o for o in node.output if live == 1 and o in last and o in layouts and o not in static]
    return found


def _reaches_the_grid(
    model: onnx.ModelProto, layer: str, logits: str, layout: Layout, types: Types, feed: dict, task: Task
) -> bool:
    """Whether the class gradient reaches the grid tokens of ``layer``: after a class-token head's last
    attention, only the prefix tokens lead to the logits, and the map would be empty. (A detector's rows are its
    first two (anchor, class) pairs, found whatever its scores; a similarity model's, two random references: its
    default, one zero vector, has no gradient anywhere.)"""
    grafted = graft(model, layer, logits, types, layout, task=task).model
    session = probe.session(grafted)
    targets = np.array([[0, 1]] if task.kind == "detection" else [[-1, -2]])
    feed = feed | {contract.TARGETS: targets, contract.FULL_GRADIENTS: np.asarray(True)}
    references = next((i for i in grafted.graph.input if i.name == contract.REFERENCES), None)
    if references is not None:  # ([R, D], D fixed: tasks.add_similarity_scores)
        dims = references.type.tensor_type.shape.dim[1].dim_value
        dtype = helper.tensor_dtype_to_np_dtype(references.type.tensor_type.elem_type)
        feed[contract.REFERENCES] = np.random.default_rng(0).standard_normal((2, dims)).astype(dtype)
    return bool(np.any(session.run([contract.GRADIENTS], feed)[0]))


def _extra_layers(
    graph: onnx.GraphProto, layers: str | None, logits: str, candidates: list[str], layouts: dict[str, Layout]
) -> tuple[str | None, list[str]]:
    """``--layer A,B,...``: the first target layer, and the others, each a usable [N, C, h, w] layer."""
    names = [] if layers is None else [name.strip() for name in layers.split(",")]
    if len(set(names)) != len(names):
        raise OnnxcamError(f"--layer names a layer twice: {', '.join(names)}")
    for name in names[1:]:
        _check_layer(graph, name, logits, candidates, layouts)
        if not layouts[name].channels_first:
            raise OnnxcamError(f"layer {name!r} is a {layouts[name].kind} layout; the layers after the first in "
                               "--layer must be [N, C, h, w] grids")  # fmt: skip
    return (names[0] if names else None), names[1:]


def _before_masks(candidates: list[str], layouts: dict[str, Layout], shapes: Shapes, classes: int) -> list[str]:
    """A segmenter's candidates less the trailing ones with one channel per class (its masks, upsampled or not),
    as pytorch-grad-cam explains a segmenter at its last feature layer; all of them if nothing is left."""
    kept = list(candidates)
    while len(kept) > 1 and layouts[kept[-1]].contract_dims(shapes[kept[-1]])[0] == classes:
        kept.pop()
    return kept


def _anchor_inputs(graph: onnx.GraphProto, scores: str, anchor_axis: int, shapes: Shapes) -> list[str]:
    """The per-scale tensors that a multi-scale detector concatenates along its anchors (a 3-D Concat over
    ``anchor_axis`` whose result holds all of them), found walking back from its class ``scores`` [N, K, A];
    none for a single scale."""
    anchors = shapes[scores][2]
    producers = {o: n for n in graph.node for o in n.output}
    todo, seen = [scores], set()
    while todo:
        name = todo.pop(0)
        node = producers.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        shape = shapes.get(node.output[0]) or []
        axis = int(next((a.i for a in node.attribute if a.name == "axis"), 0))
        over_anchors = len(shape) == 3 and axis % 3 == anchor_axis and shape[anchor_axis] == anchors
        if node.op_type == "Concat" and len(node.input) >= 2 and over_anchors:
            return list(node.input)
        todo.extend(node.input)
    return []


def _detector_heads(
    graph: onnx.GraphProto, scores: str, anchor_axis: int, layouts: dict[str, Layout], types: Types
) -> list[str]:
    """A multi-scale detector's head inputs, finest scale first: per scale, the last grid tensor that every
    path to that scale's class scores crosses and that two or more convolutions read (where the box and
    class branches of YOLOv8's Detect start). Empty when a scale has none."""
    convs = [n for n in graph.node if n.op_type == "Conv"]
    heads = []
    for branch in _anchor_inputs(graph, scores, anchor_axis, _shapes(types)):
        cuts = [c for c in candidate_layers(graph, branch, layouts, types) if layouts[c].channels_first]
        forks = [c for c in cuts if sum(n.input[0] == c for n in convs) >= 2]
        if not forks:
            return []
        heads.append(forks[-1])
    return heads


def _auto_layer(
    model: onnx.ModelProto, logits: str, candidates: list[str], layouts: dict[str, Layout], types: Types, feed: dict,
    task: Task,
) -> str:  # fmt: skip
    """The last candidate, stepping back over trailing pools and layout transposes (VGG: conv5_3 after ReLU,
    14x14, as in the paper); for tokens after a class-token head's last attention, back to the last
    candidate that the gradient reaches."""
    producers = {o: n for n in model.graph.node for o in n.output}
    layer = candidates[-1]
    while producers[layer].op_type in STEP_BACK and producers[layer].input[0] in candidates:
        layer = producers[layer].input[0]
    if not layouts[layer].has_tokens or not (layouts[layer].prefix or layouts[layer].suffix):
        return layer
    for name in reversed(candidates[: candidates.index(layer) + 1]):
        if layouts[name].has_tokens and _reaches_the_grid(model, name, logits, layouts[name], types, feed, task):
            return name
    raise OnnxcamError("the class gradient reaches no token layer's grid; pick a layer with --layer")


def _logits(graph: onnx.GraphProto, notes: list[str]) -> str:
    """The pre-softmax scores feeding the first graph output."""
    producers = {o: n for n in graph.node for o in n.output}
    name = graph.output[0].name
    if len(graph.output) > 1:
        notes.append(f"the model has {len(graph.output)} outputs; explaining the first, {name!r}")
    current = name
    while current in producers and producers[current].op_type in PASS_THROUGH:
        current = producers[current].input[0]
    if current in producers and producers[current].op_type in SOFTMAX:
        node = producers[current]
        notes.append(f"the model ends in {node.op_type}; explaining the pre-softmax logits {node.input[0]!r}")
        return node.input[0]
    return name


OUTPUT_LAYOUTS = (
    "classifier [N, K] (or [N, K, 1, 1]), semantic segmenter [N, K, H, W], ultralytics detector [N, 4 + K, A], "
    "YOLOv5 detector [N, A, 5 + K], a pair of class scores [N, A, K] and boxes [N, A, 4] (SSD, RetinaNet; DETR's "
    "[N, Q, K + 1] logits), or a CTC text recogniser's per-step softmax [N, T, K]"
)


def _task_of(shape: list[int | None] | None, forced: str | None, detector: bool) -> str | None:
    """The task whose output layout ``shape`` has (``forced``: only that one is tried), ``detector`` whether the
    outputs have a detector's layout; None for none."""
    rank = len(shape or [])
    fits = {
        "classification": rank == 2 or (rank == 4 and shape[2:] == [1, 1]),
        "segmentation": rank == 4 and all(isinstance(d, int) and d >= 2 for d in shape[2:]),
        "detection": detector,
        "recognition": rank == 3 and forced == "recognition",  # (told by its softmax: :func:`_recogniser`)
        "regression": rank == 2 and forced == "regression",  # (only when told: it has a classifier's shape)
        "similarity": rank == 2 and forced == "similarity",  # (told by its normalisation or name: _embedding)
    }
    return next((task for task in ([forced] if forced else TASKS) if fits[task]), None)


SQUASHING = ops_with("squashing")  # an image's last op; a segmenter's scores are logits


def _one_channel(model: onnx.ModelProto, raw: str, types: Types, shapes: Shapes, notes: list[str]) -> tuple[str, float]:
    """A one-channel map (text detection, portrait and salient-object masks, binary medical masks) as the scores
    of a one-class segmenter ``[N, 1, H, W]``, and the value above which a pixel is foreground: the logits before
    its Sigmoid (above 0), or the map itself (squashed into 0..1 by another op: above 0.5; unsquashed: above 0).
    A ``[N, H, W, 1]`` map is transposed first. Any other output is returned as it is."""
    shape = shapes.get(raw) or []
    last = len(shape) == 4 and shape[3] == 1 and all(isinstance(d, int) and d >= 2 for d in shape[1:3])
    if not last and not (len(shape) == 4 and shape[1] == 1 and all(isinstance(d, int) and d >= 2 for d in shape[2:])):
        return raw, 0.0
    producers = {o: n for n in model.graph.node for o in n.output}
    current = raw
    while current in producers and (producers[current].op_type in PASS_THROUGH
                                    or producers[current].op_type == "Transpose"):  # fmt: skip
        current = producers[current].input[0]
    node = producers.get(current)
    before = shapes.get(node.input[0]) if node is not None else None
    one_map = before is not None and len(before) == 4 and 1 in (before[1], before[3])
    if node is not None and node.op_type == "Sigmoid" and one_map:
        notes.append(f"the one-channel map ends in Sigmoid; explaining the logits before it {node.input[0]!r}")
        raw, threshold, last = node.input[0], 0.0, before[1] != 1
    else:
        threshold = 0.5 if node is not None and node.op_type in SQUASHING else 0.0
    if last:  # channels last: [N, H, W, 1] -> [N, 1, H, W]
        first = f"{raw}/channels_first"
        model.graph.node.append(make_node("Transpose", [raw], [first], first, perm=[0, 3, 1, 2]))
        shapes[first] = [shapes[raw][0], 1, *shapes[raw][1:3]]
        types[first] = helper.make_tensor_type_proto(types[raw].elem_type, shapes[first]).tensor_type
        raw = first
    return raw, threshold


def _refuse_an_image(graph: onnx.GraphProto, raw: str, shape: list[int | None], size: tuple[int, int]) -> None:
    """A ``[N, 3, H, W]`` output of the input's size squashed into a range is an image (an autoencoder, a denoiser),
    not a segmenter's class logits."""
    producer = next((n for n in graph.node if raw in n.output), None)
    if shape[1:] == [3, *size] and producer is not None and producer.op_type in SQUASHING:
        raise OnnxcamError(
            f"the model's output {raw!r} {shape} has the input's shape and ends in {producer.op_type}: it is an "
            "image (an autoencoder, a denoiser), not class scores; onnxcam explains classifiers, segmenters and "
            "detectors (a 3-class segmenter read as this: force it with --task segmentation)"
        )


KEYPOINTS = re.compile(r"(?:^|[^a-z])(?:heat_?map|key_?point|kpt|landmark|pose)", re.I)  # pose models' outputs
EMBEDDING = re.compile(r"(?:^|[^a-z])(?:embed|pooler|feature|hidden|descriptor)", re.I)  # embedding models' outputs
NOT_EXPLAINED = ("onnxcam explains classifiers, segmenters, detectors and CTC text recognisers; force a task with "
                 "--task where the output is one of those")


def _normalised(graph: onnx.GraphProto, name: str) -> bool:
    """Whether ``name`` is L2-normalised where it is made: LpNormalization, or a Div by a norm (ReduceL2, or the
    Sqrt of a sum of squares, maybe clamped), as an embedding model's last step."""
    producers = {o: n for n in graph.node for o in n.output}
    node = producers.get(name)
    while node is not None and node.op_type in PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("LpNormalization", "Div"):
        return False
    if node.op_type == "LpNormalization":
        return True
    todo, seen = [node.input[1]], 0
    while todo and seen < 8:  # a few steps back along the divisor: Expand, Clip, Max, Sqrt, ReduceSum(Pow)
        found = producers.get(todo.pop())
        seen += 1
        if found is None:
            continue
        if found.op_type in ("ReduceL2", "ReduceSumSquare", "LpNormalization") or (
            found.op_type == "Sqrt" and producers.get(found.input[0]) is not None
            and producers[found.input[0]].op_type in ("ReduceSum", "ReduceSumSquare")
        ):  # fmt: skip
            return True
        todo.extend(i for i in found.input[:1] if i)
    return False


def _recogniser(graph: onnx.GraphProto, shapes: Shapes) -> str | None:
    """Why the first output is a sequence recogniser's (CTC text recognition: CRNN, SVTR), or None: a softmax over
    the last axis of ``[N, T, K]`` with no boxes ``[N, A, 4]`` beside it (a detector's class probabilities)."""
    output = graph.output[0].name
    shape = shapes.get(output) or []
    producers = {o: n for n in graph.node for o in n.output}
    node = producers.get(output)
    while node is not None and node.op_type in PASS_THROUGH:
        node = producers.get(node.input[0])
    if len(shape) != 3 or node is None or node.op_type not in SOFTMAX:
        return None
    axis = int(next((a.i for a in node.attribute if a.name == "axis"), -1)) % 3
    boxes = any(len(shapes.get(o.name) or []) == 3 and shapes[o.name][2] == 4 for o in graph.output[1:])
    image = shapes.get(graph.input[0].name) or []
    longest = max((d for d in image[1:] if isinstance(d, int)), default=None)
    if axis != 2 or boxes or (isinstance(shape[1], int) and longest is not None and shape[1] > longest):
        return None  # (more steps than the input has columns: a flattened map, a detector's anchors)
    if image and shape[0] != image[0] and shape[1] == image[0]:
        raise OnnxcamError(f"the model's output {output!r} {shape} is a {node.op_type} over {shape[2]} symbols per "
                           "step, time-major [T, N, K] (a CRNN's): transpose it to [N, T, K] (torch: "
                           "log_probs.permute(1, 0, 2)) before the export")  # fmt: skip
    return f"a {node.op_type} over {shape[2]} symbols at each of {shape[1]} steps"


def _embedding(graph: onnx.GraphProto, shapes: Shapes) -> str | None:
    """Why the first output ``[N, D]`` is an embedding (L2-normalised, or named so), or None."""
    output = graph.output[0].name
    if len(shapes.get(output) or []) != 2:
        return None
    if _normalised(graph, output):
        return "is L2-normalised"
    return "is named as one" if EMBEDDING.search(output) else None


def _refuse_a_false_friend(model: onnx.ModelProto, shapes: Shapes, family: str | None) -> None:
    """Outputs whose shapes fit a task onnxcam explains but which are something else, refused with what they are:
    keypoints (heat maps ``[N, J, h, w]`` by name or family)."""
    graph = model.graph
    output = graph.output[0].name
    shape = shapes.get(output) or []
    if KEYPOINTS.search(output) or (family or "").lower() in ("vitpose", "pose"):
        raise OnnxcamError(f"the model's output {output!r} {shape} holds keypoints (a pose model's heat maps or "
                           f"coordinates), which onnxcam does not explain; {NOT_EXPLAINED}")  # fmt: skip


def _outputs_found(graph: onnx.GraphProto, shapes: Shapes) -> str:
    return ", ".join(f"{o.name!r} {shapes.get(o.name)}" for o in graph.output)


def _task_logits(
    model: onnx.ModelProto, types: Types, forced: str | None, notes: list[str], decoding: Decoding,
    layout: str | None = None, scale: float | None = None,
) -> tuple[str, Task, int]:  # fmt: skip
    """The logits the graft explains, the task and its class count, from the model's outputs (``layout``: a
    detector's :data:`DETECTOR_LAYOUTS` entry, forced; ``scale``: an image-text model's logit scale)."""
    shapes = _shapes(types)
    if forced is None and layout is None:
        _refuse_a_false_friend(model, shapes, decoding.family)
        embedding = _embedding(model.graph, shapes)
        if embedding:
            notes.append(f"the model's output {model.graph.output[0].name!r} {embedding}: an embedding, explained by "
                         "its cosine similarity to the references each call gives (explain --like)")  # fmt: skip
            forced = "similarity"
        recogniser = _recogniser(model.graph, shapes)
        if recogniser:
            notes.append(f"the model's output {model.graph.output[0].name!r} is {recogniser}: a sequence "
                         "recogniser (CTC text recognition)")  # fmt: skip
            forced = "recognition"
    stepped: list[str] = []
    as_they_are = forced in ("regression", "similarity")
    raw = model.graph.output[0].name if as_they_are else _logits(model.graph, stepped)
    raw, threshold = _one_channel(model, raw, types, shapes, stepped)
    detected = detector_layout(shapes, raw, [o.name for o in model.graph.output], layout, decoding.size,
                               decoding.family)  # fmt: skip
    task = _task_of(shapes.get(raw), "detection" if layout else forced, detected is not None)
    if task is None:
        asked = f"a {layout} detector's" if layout else f"a {forced}" if forced else "a layout onnxcam knows"
        raise OnnxcamError(
            f"the model's outputs ({_outputs_found(model.graph, shapes)}) are not {asked} output: onnxcam explains "
            f"a {OUTPUT_LAYOUTS}; export the model with such an output first (ultralytics: nms=False), or force "
            f"the task with --task and a detector's layout with --detector-layout ({', '.join(DETECTOR_LAYOUTS)})"
        )
    if task != "detection" or len(detected[1]) == 1:
        notes.extend(stepped)
    shape = shapes.get(raw)
    if task not in ("detection", "recognition") and decoding.background is not None:
        raise OnnxcamError(f"--background names a detector's background class or a recogniser's blank; this is a "
                           f"{task} model")  # fmt: skip
    if task == "recognition":
        blank = 0 if decoding.background is None else decoding.background
        notes.append(f"{raw!r} {shape} is read as a CTC recogniser's per-step scores, greedily decoded, symbol "
                     f"{blank} the blank{'' if decoding.background is not None else ' (--background)'}: each target "
                     "is one decoded character, its probability summed over its steps")  # fmt: skip
        return add_recognition_scores(model, raw, types, blank), Task(task, outputs=contract.TASK_OUTPUTS[task],
                                                                      explained="probability", background=blank
                                                                      ), shape[2]  # fmt: skip
    if task == "segmentation" and forced is None:
        _refuse_an_image(model.graph, raw, shape, decoding.size)
    if task == "segmentation":
        notes.append(f"{raw!r} {shape} is a semantic segmentation: the explained score of class c is the sum of "
                     "its logits over the pixels predicted as c, or over the region a mask gives")  # fmt: skip
        if shape[1] == 1:
            notes.append(f"{raw!r} is one channel: a segmenter of one foreground class, the pixels where it is above "
                         f"{threshold:g}")  # fmt: skip
        scores = add_segment_scores(model, raw, types, decoding.size, threshold)
        return scores, Task(task, outputs=contract.TASK_OUTPUTS[task]), shape[1]
    if task == "detection":
        return _detector_split(model, types, *detected, decoding, notes)
    if task == "similarity":
        return add_similarity_scores(model, raw, types, scale), Task(task, outputs=contract.TASK_OUTPUTS[task],
                                                              explained="value"), 1  # fmt: skip
    if task == "regression":
        notes.append(f"{raw!r} {shape} is read as a regressor's values: each target is one output coordinate, its "
                     "map where the evidence raises it")  # fmt: skip
        return _flatten_logits(model, raw, shapes), Task(task, explained="value"), shape[1]
    if shape[1] == 1:
        raise OnnxcamError(f"the model's output {raw!r} {shape} is one score per image (a regressor, or a sigmoid "
                           "for one class), not class scores that a softmax ranks: explain its value with --task "
                           "regression; onnxcam explains classifiers of 2 or more classes this way (a detector or "
                           "segmenter read as this: force its task with --task)")  # fmt: skip
    return _flatten_logits(model, raw, shapes), Task(task), shape[1]


def _extra_rows(graph: onnx.GraphProto, shapes: Shapes, facts: Facts) -> tuple[int, str | None]:
    """How many values per anchor of an ultralytics output follow its class scores and are no classes: a pose
    model's keypoints (its metadata's ``kpt_shape``), an instance segmenter's mask coefficients (as many as the
    channels of its prototype output ``[N, M, h, w]``, its second, also returned). Oriented boxes are refused."""
    family = facts.values.get("family")
    if family == "ultralytics-obb":
        raise OnnxcamError("an ultralytics OBB model predicts rotated boxes, which ultralytics suppresses by their "
                           "rotated overlap and onnxcam's in-graph NMS (axis-aligned) does not; onnxcam explains "
                           "ultralytics' detect, segment, pose and classify exports")  # fmt: skip
    if family == "ultralytics-pose":
        return int(facts.values["keypoints"]), None
    protos = [o.name for o in graph.output[1:] if len(shapes.get(o.name) or []) == 4
              and all(isinstance(d, int) for d in shapes[o.name][1:])]  # fmt: skip
    if family == "ultralytics-segment" and not protos:
        raise OnnxcamError("the ultralytics metadata says segment but the model has no prototype output "
                           "[N, 32, h, w] beside its detections; re-export it with ultralytics")  # fmt: skip
    if family == "ultralytics-segment":
        return shapes[protos[0]][1], protos[0]
    first, image = shapes.get(graph.output[0].name) or [], shapes.get(graph.input[0].name) or []
    sides = sorted(d for d in image[1:] if isinstance(d, int) and d > 3)[-2:]  # the input's (h, w), NCHW or NHWC
    if protos and len(graph.output) == 2 and len(first) == 3 and isinstance(first[1], int) and len(sides) == 2:
        channels, grid = shapes[protos[0]][1], sorted(shapes[protos[0]][2:])
        if channels < first[1] - 4 and grid == [side // 4 for side in sides]:  # ultralytics' Proto: input / 4
            return channels, protos[0]
    return 0, None


def _detector_split(
    model: onnx.ModelProto, types: Types, name: str, reads: list[str], decoding: Decoding, notes: list[str]
) -> tuple[str, Task, int]:
    """A detector's class scores (the logits), its task and class count, per layout ``name`` of outputs ``reads``."""
    layout, shapes = DETECTOR_LAYOUTS[name], _shapes(types)
    classes = class_count(name, [shapes[r] for r in reads], decoding)
    if classes < 1:
        raise OnnxcamError(f"{' and '.join(f'{r!r} {shapes[r]}' for r in reads)} leave no class scores beside the "
                           f"{decoding.extra} values per anchor that are no classes; re-export the model")  # fmt: skip
    if decoding.extra and layout.extra_rows:
        what = "its keypoints" if decoding.family == "ultralytics-pose" else "its instance masks' coefficients"
        notes.append(f"the last {decoding.extra} values per anchor are no classes ({what}): each box's class score "
                     "is explained")  # fmt: skip
    if decoding.box_format is not None and decoding.box_format not in layout.box_formats:
        raise OnnxcamError(f"--box-format applies to a pair of scores and boxes in pixels (ssd); {name}'s boxes are "
                           "fixed by its layout")  # fmt: skip
    if decoding.background is not None and not 0 <= decoding.background < classes:
        raise OnnxcamError(f"--background {decoding.background} is not a class: the model scores {classes} classes "
                           f"(0-{classes - 1})")  # fmt: skip
    outputs = " and ".join(f"{r!r} {shapes[r]}" for r in reads)
    notes.append(f"{outputs} {'is' if len(reads) == 1 else 'are'} {layout.described}, K = {classes}: each target is "
                 "one box's class score")  # fmt: skip
    if layout.box_formats:
        notes.append(f"boxes read as {decoding.box_format or layout.box_formats[0]} in input pixels (--box-format)")
    if decoding.background is not None:
        notes.append(f"class {decoding.background} is the background: never a detection")
    taken = set(reads) & set(contract.DETECTION_OUTPUTS)  # an output called boxes moves aside for the contract's
    for tensor in taken:
        rename_tensor(model.graph, tensor, f"{tensor}/original")
    reads = [f"{r}/original" if r in taken else r for r in reads]
    types = {f"{t}/original" if t in taken else t: value for t, value in types.items()}
    return CLASS_SCORES, add_detector_split(model, reads, types, name, decoding), classes


def _flatten_logits(model: onnx.ModelProto, logits: str, shapes: Shapes) -> str:
    """``[N, K, 1, 1]`` scores (a 1x1-conv classifier) become ``[N, K]``."""
    shape = shapes.get(logits)
    if shape is None or len(shape) == 2:
        return logits
    if any(d != 1 for d in shape[2:]):
        raise OnnxcamError(f"the scores {logits!r} have shape {shape}; onnxcam needs [N, K] (or [N, K, 1, 1])")
    flat = "onnxcam/logits_flat"
    model.graph.node.append(make_node("Flatten", [logits], [flat], flat, axis=1))
    return flat


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _upgrade(model: onnx.ModelProto, layer: str, logits: str, notes: list[str]) -> onnx.ModelProto:
    """Raise the opset only as far as the rules need, and say so."""
    head = head_nodes(model.graph, layer, logits)
    needs = {n.op_type: RULES[n.op_type].opset for n in head if n.op_type in RULES and RULES[n.op_type].opset}
    needed = max([MIN_OPSET, *needs.values()])
    current = _opset(model)
    if current >= needed:
        return model
    ops = sorted(op for op, opset in needs.items() if opset == needed)
    why = f"reduction='add' scatters for the {', '.join(ops)} rules" if ops else "TopK/GatherElements"
    try:
        converted = onnx.version_converter.convert_version(model, needed)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        raise OnnxcamError(f"cannot upgrade the model from opset {current} to {needed} ({why}): {exc}") from exc
    notes.append(f"upgraded opset {current} -> {needed} with onnx's version converter ({why})")
    return _modern_ir(converted)


def _modern_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    """IR >= 4 (weights need not be graph inputs) and new enough for the default opset (other domains, such as
    an unused com.microsoft or a custom one, have no entry in onnx's table); weights stop being inputs."""
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    model.ir_version = max(model.ir_version, 4, helper.find_min_ir_version_for(default))
    weights = {i.name for i in model.graph.initializer} - {contract.REGION}  # (an input with a default)
    kept = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def _check_opsets(model: onnx.ModelProto, source: Path) -> None:
    """A default-domain opset this onnx package knows (the rules are written against it)."""
    known = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= known:
            raise OnnxcamError(f"{source} imports ONNX opset {opset.version}; the installed onnx package knows opsets "
                               f"up to {known}: upgrade onnx (pip install -U onnx), or export the model at opset "
                               f"{known} or below")  # fmt: skip


CONTRACT_NAMES = {v for k, v in vars(contract).items() if k.isupper() and isinstance(v, str) and v.isidentifier()}


def _clear_names(graph: onnx.GraphProto) -> None:
    """Make room for the contract: tensors named like its inputs and outputs (``image``, ``targets``, ...; not
    ``logits``, which the graft explains as it is) move aside to ``<name>/original``, and repeated node names get
    a suffix (ONNX Runtime refuses a graph with two nodes of one name)."""
    names = {o for n in graph.node for o in n.output} | {i.name for i in [*graph.input, *graph.initializer]}
    for name in sorted((CONTRACT_NAMES - {contract.LOGITS}) & names):
        rename_tensor(graph, name, f"{name}/original")
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if node.name and node.name in seen:
            node.name = f"{node.name}/{i}"
        seen.add(node.name)


def _model_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise OnnxcamError(f"onnxcam needs a model with one image input; this one has {[i.name for i in inputs]}")
    return inputs[0]


@dataclass(frozen=True)
class InputLayout:
    """The model's image input: its name, channel position, size and element type."""

    name: str
    channels_first: bool
    height: int
    width: int
    elem_type: int
    batch: onnx.TensorShapeProto.Dimension


PROBE_TOLERANCE = 1e-4  # float32 sums over a few thousand products, relative to the largest value


def _checked_windows(
    windowed: onnx.ModelProto, dense: onnx.ModelProto, inputs: InputLayout, notes: list[str]
) -> onnx.ModelProto:
    """``windowed`` where its weights and gradients equal those of ``dense`` on a probe (random pixels; the
    top detections, the first and last anchors of each class, two classes at one anchor), else ``dense``.

    The window walk assumes YOLO's anchor order and a tail that maps each anchor's pixel alone; this
    catches a model that differs."""
    if windowed.ByteSize() > 1 << 30:  # (too large to pass by bytes: keep the dense walk, which needs no probe)
        notes.append("the backward walks whole feature maps (the model is too large to probe the window walk)")
        return dense
    classes, anchors = (d.dim_value for d in _output(windowed, contract.LOGITS).type.tensor_type.shape.dim[1:])
    codes = [-1, -2, -3, 0, anchors - 1, (classes - 1) * anchors + anchors - 1, anchors // 2,
             (classes - 1) * anchors + anchors // 2, anchors // 2]  # fmt: skip
    rng = np.random.default_rng(0)
    batch = inputs.batch.dim_value if inputs.batch.HasField("dim_value") else 2
    feed = {
        contract.IMAGE: rng.integers(0, 256, (batch, inputs.height, inputs.width, 3), dtype=np.uint8),
        contract.TARGETS: np.tile(np.asarray(codes, np.int64), (batch, 1)),
        contract.FULL_GRADIENTS: np.asarray(True),
        contract.CONF_THRESHOLD: np.asarray(0.0, np.float32),
        contract.RETURN_SALIENCY: np.asarray(False),
        contract.SALIENCY_METHOD: np.asarray(0, np.int64),
        contract.RETURN_PIXELS: np.asarray(False),
        contract.RETURN_GUIDED: np.asarray(False),
        contract.PIXEL_ALPHAS: np.ones(batch, np.float32),
        contract.PIXEL_BASELINES: np.zeros((1, 3, inputs.height, inputs.width), np.float32),
        contract.PIXEL_NOISE: np.zeros((1, 3, inputs.height, inputs.width), np.float32),
    }
    results = []
    for model in (windowed, dense):
        session = probe.session(model)
        names = [o.name for o in session.get_outputs() if o.name.startswith((contract.WEIGHTS, contract.GRADIENTS))]
        known = {i.name for i in model.graph.input}
        results.append(session.run(names, {k: v for k, v in feed.items() if k in known}))
    if all(np.abs(w - d).max() <= PROBE_TOLERANCE * max(np.abs(d).max(), 1e-30) for w, d in zip(*results, strict=True)):
        notes.append("the backward walks each box over the windows of the feature maps that its score reads")
        return windowed
    notes.append("the backward walks whole feature maps: the window walk did not reproduce it on this model")
    return dense


def _output(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    return next(o for o in model.graph.output if o.name == name)


def _channels_first(graph: onnx.GraphProto, name: str) -> bool | None:
    """Where a convolution reading the input finds 3 channels: True when it reads the input directly or through
    Cast/Identity/Pad (NCHW: Hugging Face's EfficientNet pads before its stem), False after a Transpose to NCHW
    (NHWC); None if no such convolution does."""
    weights = {i.name: i for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    todo, seen = [(name, True)], set()
    while todo:
        tensor, first = todo.pop()
        for node in readers.get(tensor, []):
            perm = list(next((a.ints for a in node.attribute if a.name == "perm"), []))
            if node.op_type in ("Cast", "Identity", "Pad") and node.input[0] == tensor and node.output[0] not in seen:
                todo.append((node.output[0], first))
            elif node.op_type == "Transpose" and perm == [0, 3, 1, 2] and first:
                todo.append((node.output[0], False))
            elif node.op_type == "Conv" and node.input[0] == tensor and node.input[1] in weights:
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                if weights[node.input[1]].dims[1] * group == 3:
                    return first
            seen.update(node.output)
    return None


def _input_layout(graph: onnx.GraphProto, facts: Facts, notes: list[str]) -> InputLayout:
    """The image input's layout and size: a symbolic channel axis (optimum leaves it so) is told from the first
    convolution and written into the graph; the size is the model's own where fixed, else the facts'."""
    original = _model_input(graph)
    dims_proto = original.type.tensor_type.shape.dim
    dims = [d.dim_value if d.HasField("dim_value") else None for d in dims_proto]
    if len(dims) == 4 and 3 not in (dims[1], dims[3]) and None in (dims[1], dims[3]):
        first = _channels_first(graph, original.name)
        axis = {True: 1, False: 3}.get(first)
        if axis is not None and dims[axis] is None:
            dims_proto[axis].Clear()
            dims_proto[axis].dim_value = dims[axis] = 3
            shown = "[N, 3, H, W]" if first else "[N, H, W, 3]"
            notes.append(f"input {original.name!r}: its channel axis is symbolic; the first convolution reads 3 "
                         f"channels {'first' if first else 'last'}: {shown}")  # fmt: skip
    if len(dims) != 4 or 3 not in (dims[1], dims[3]):
        raise OnnxcamError(f"input {original.name!r} has shape {dims}; onnxcam needs [N, 3, H, W] or [N, H, W, 3] "
                           "and no convolution reading it tells which axis holds the 3 channels; export the model "
                           "with a fixed channel axis")  # fmt: skip
    channels_first = dims[1] == 3
    fixed = (dims[2], dims[3]) if channels_first else (dims[1], dims[2])
    given = facts.values.get("size")
    if given is not None and any(f and f != g for f, g in zip(fixed, given, strict=True)):
        shown = "x".join(str(f or "?") for f in fixed)
        raise OnnxcamError(f"the input size {given[0]}x{given[1]} ({facts.sources['size']}) contradicts the model's "
                           f"fixed input size {shown}; give --size {shown.replace('?', 'W')}")  # fmt: skip
    if all(fixed):
        facts.values["size"], facts.sources["size"] = fixed, "the model's input"
    elif given is None:
        raise OnnxcamError(f"input {original.name!r} has a dynamic size and neither its metadata nor a sidecar names "
                           "one; pass --size (e.g. --size 224, or --size 48 192 for height and width)")  # fmt: skip
    height, width = facts.values["size"]
    elem = original.type.tensor_type.elem_type
    return InputLayout(original.name, channels_first, height, width, elem, dims_proto[0])


def _feed(layout: InputLayout, batch: int = 1, seed: int | None = None) -> dict[str, np.ndarray]:
    """The model's input at its size: zeros, or seeded standard normal values."""
    shape = (
        [batch, 3, layout.height, layout.width] if layout.channels_first else [batch, layout.height, layout.width, 3]
    )
    values = np.zeros(shape) if seed is None else np.random.default_rng(seed).standard_normal(shape)
    return {layout.name: values.astype(helper.tensor_dtype_to_np_dtype(layout.elem_type))}


def _feeds(layout: InputLayout) -> list[dict[str, np.ndarray]]:
    """The model's input at two batch sizes (at its own, if fixed): what differs between them is the batch."""
    return [_feed(layout, b) for b in ([layout.batch.dim_value] if layout.batch.HasField("dim_value") else [1, 2])]


def _cannot_run(layout: InputLayout, exc: Exception) -> OnnxcamError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OnnxcamError(f"ONNX Runtime cannot run the model at the input size {layout.height}x{layout.width} "
                        f"({first[:300]}); give the size the model was made for with --size H W")  # fmt: skip


def _annotate_shapes(model: onnx.ModelProto, layout: InputLayout) -> Types:
    try:
        return annotate_shapes(model, _feeds(layout), layout.batch)
    except (RuntimeError, ValueError) as exc:
        raise _cannot_run(layout, exc) from exc


def _fold_shapes(model: onnx.ModelProto, layout: InputLayout) -> None:
    """Fold what the model computes from tensor shapes and is static at its input size."""
    try:
        fold_shape_computations(model, _feeds(layout))
    except (RuntimeError, ValueError) as exc:
        raise _cannot_run(layout, exc) from exc


def _prepend_preprocessing(model: onnx.ModelProto, layout: InputLayout, prep: Resolved) -> None:
    """Replace the float image input by uint8 RGB ``[N, H, W, 3]`` and the ops that normalise it."""
    graph = model.graph
    original = _model_input(graph)
    channels_first, height, width = layout.channels_first, layout.height, layout.width
    image = helper.make_tensor_value_info(contract.IMAGE, TensorProto.UINT8, [None, height, width, 3])
    image.type.tensor_type.shape.dim[0].CopyFrom(layout.batch)
    # (pixel - 255 mean) / (255 std) as pixel * scale + shift, per channel of the model's layout:
    # ORT broadcasts [1, 3, 1, 1] over NCHW faster than [3] over NHWC, and Mul beats Div
    mean = (np.asarray(prep.mean, np.float64) * 255)[:: -1 if prep.bgr else 1]
    std = (np.asarray(prep.std, np.float64) * 255)[:: -1 if prep.bgr else 1]
    per_channel = [1, 3, 1, 1] if channels_first else [3]
    constants = {
        "onnxcam/scale": (1 / std).reshape(per_channel).astype(np.float32),
        "onnxcam/shift": (-mean / std).reshape(per_channel).astype(np.float32),
    } | ({"onnxcam/bgr": np.asarray([2, 1, 0], np.int64)} if prep.bgr else {})  # (no dead weight in the file)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    steps = [("Cast", [], {"to": TensorProto.FLOAT})]
    steps += [("Gather", ["onnxcam/bgr"], {"axis": 3})] if prep.bgr else []
    steps += [("Transpose", [], {"perm": [0, 3, 1, 2]})] if channels_first else []
    steps += [("Mul", ["onnxcam/scale"], {}), ("Add", ["onnxcam/shift"], {})]
    steps += [("Cast", [], {"to": layout.elem_type})] if layout.elem_type != TensorProto.FLOAT else []
    nodes, current = [], contract.IMAGE
    for i, (op_type, extra, attrs) in enumerate(steps):
        output = original.name if i == len(steps) - 1 else f"onnxcam/preprocess_{i}"
        nodes.append(make_node(op_type, [current, *extra], [output], f"onnxcam/preprocess_{i}", **attrs))
        current = output
    graph.input.remove(original)
    graph.input.insert(0, image)
    for node in reversed(nodes):
        graph.node.insert(0, node)


BLANK = "<blank>"  # a recogniser's CTC blank, where its character list leaves it out


def _labels(facts: Facts, classes: int, notes: list[str], background: int | None = None, blank: int | None = None,
            kind: str = "classification") -> tuple[list[str], str]:  # fmt: skip
    """The class names and where they came from: ``--labels``, the file's metadata or sidecar, or assumed;
    a recogniser's (``blank``: its CTC blank) are its symbols, from a character list with or without the blank; a
    regressor's name its outputs (``output i`` where nothing does)."""
    if blank is not None:
        return _symbols(facts, classes, notes, blank)
    if kind == "similarity":  # (its references, given with each call, are its "classes")
        return ["reference"], "assumed (a similarity model: its references come with each call)"
    if kind == "regression" and "labels" not in facts.values:
        return [f"output {i}" for i in range(classes)], "assumed (output i)"
    if "labels" in facts.values:
        names, source = facts.values["labels"], facts.sources["labels"]
    elif classes == 1:
        return ["foreground"], "assumed (one class: the foreground)"
    elif classes == 1000:
        notes.append("no --labels: using the ImageNet-1k class names (the model scores 1000 classes)")
        return imagenet_labels(), "assumed (ImageNet-1k: the model scores 1000 classes)"
    else:
        notes.append(f"no --labels: classes are named 'class 0' ... 'class {classes - 1}'")
        return ["background" if i == background else f"class {i}" for i in range(classes)], "assumed (class i)"
    if len(names) != classes:
        raise OnnxcamError(f"{source} gives {len(names)} labels but the model scores {classes} classes")
    return list(names), source


def _symbols(facts: Facts, classes: int, notes: list[str], blank: int) -> tuple[list[str], str]:
    """A recogniser's K symbols: ``--labels`` with all K, or the K - 1 characters without the blank (PaddleOCR's
    dictionaries, the blank first, or last); without labels, ``[i]`` (a text reads ``[3][7]``)."""
    if "labels" not in facts.values:
        notes.append(f"no --labels: symbols are named '[0]' ... '[{classes - 1}]' (give the character list)")
        return [BLANK if i == blank else f"[{i}]" for i in range(classes)], "assumed ([i])"
    names, source = list(facts.values["labels"]), facts.sources["labels"]
    if len(names) == classes:
        return names, source
    if len(names) == classes - 1 and blank in (0, classes - 1):
        notes.append(f"{source} lists the {len(names)} characters; the blank is symbol {blank}")
        return [BLANK, *names] if blank == 0 else [*names, BLANK], source
    space = " PaddleOCR's dictionaries leave out the space that use_space_char adds too: give a JSON list with it"
    raise OnnxcamError(f"{source} gives {len(names)} characters but the recogniser scores {classes} symbols, the "
                       f"blank {blank} among them: give all {classes}, or the {classes - 1} besides the blank"
                       f"{'.' + space if len(names) == classes - 2 else ''}")  # fmt: skip


def _resolve(facts: Facts, notes: list[str]) -> Resolved:
    """The facts found, the defaults for the rest (each assumed one a note), and every fact's source."""
    values, sources = dict(facts.values), dict(facts.sources)
    assumed = [key for key in DEFAULTS if key not in values]
    for key in assumed:
        values[key], sources[key] = DEFAULTS[key], "assumed"
    if assumed:
        notes.append(f"warning: nothing names the {', '.join(assumed)}: assuming "
                     f"{', '.join(ASSUMED[k] for k in assumed)} (name them with flags or --preprocess)")  # fmt: skip
    if isinstance(values["resize"], str):  # a --resize name, for this input size
        values["resize"] = RESIZES[values["resize"]](tuple(values["size"]))
    return Resolved(tuple(values["size"]), tuple(values["mean"]), tuple(values["std"]), bool(values["bgr"]),
                    values["resize"], sources)  # fmt: skip


def _check_layer(graph: onnx.GraphProto, layer: str, logits: str, candidates: list[str], layouts: dict) -> bool:
    """Whether a ``--layer`` is a cut; a tensor with a grid on a path to the logits that is not a cut is
    allowed too (its gradient is a partial derivative, as a hook's in pytorch-grad-cam: a ViT block's
    norm1), anything else is refused with the candidates."""
    if layer in candidates:
        return True
    try:
        head_nodes(graph, layer, logits)
    except UnsupportedOp:
        pass
    else:
        if layer in layouts:
            return False
    shown = ", ".join(candidates[-15:])
    raise OnnxcamError(f"layer {layer!r} is not a usable target; candidates (last {min(15, len(candidates))} of "
                       f"{len(candidates)}, graph order): {shown}")  # fmt: skip


def graft_file(
    source: Path,
    out: Path,
    layer: str | None = None,
    labels: Path | None = None,
    prep: Preprocessing | None = None,
    score: str = "logit",
    task: str | None = None,
    layout: str | None = None,
    box_format: str | None = None,
    background: int | None = None,
    windowed: bool = True,
    text: Path | None = None,
    tokenizer: Path | None = None,
    logit_scale: float | None = None,
    prompts: Path | None = None,
    pixels: bool = False,
) -> tuple[dict[str, object], list[str]]:
    """Write ``out``, the onnxcam version of classifier, segmenter, detector or image-text model ``source``; return
    its card and notes for the user.

    ``score``: the explained score, ``logit`` (as the Grad-CAM paper) or ``probability`` (its softmax).
    ``task``: one of :data:`onnxcam.contract.TASKS`, or None to tell it from the output's layout.
    ``layout``: a detector's :data:`DETECTOR_LAYOUTS` entry, or None to tell it from its outputs;
    ``box_format``: a pair's boxes (:data:`BOX_FORMATS`); ``background``: a detector's class that is never a detection.
    ``windowed``: a detector's backward over the windows each box reads where that reproduces the walk over
    whole feature maps (:mod:`onnxcam_export.windowed`); False: over whole maps. An image-text model (CLIP: the
    combined export, or its image tower with ``text``, its text tower; ``tokenizer``, its ``tokenizer.json``
    where none lies beside it; ``logit_scale``, where the combined export does not give it) is a similarity model
    whose references are text prompts' embeddings, its text tower written beside ``out``; with ``prompts`` (a
    file of one prompt per line) it is a zero-shot classifier of those prompts instead (:mod:`image_text`).
    ``pixels``: the backward also reaches the model's float input (pixel attributions; :func:`graft.graft`).
    """
    _check_options(score, task, layout, box_format)
    given = (prep or Preprocessing()).given
    if labels is not None:  # read before any work: a bad file is refused at once
        given = Facts(dict(given.values), dict(given.sources)).add(f"flag --labels {Path(labels).name}",
                                                                    labels=labels_file(Path(labels)))  # fmt: skip
    baked = None if prompts is None else image_text.prompts_file(Path(prompts))
    if baked is not None:
        given = Facts(dict(given.values), dict(given.sources)).add(f"the prompts of --prompts {Path(prompts).name}",
                                                                    labels=baked)  # fmt: skip
    notes: list[str] = []
    model, facts = _load_source(Path(source), given)
    with tempfile.TemporaryDirectory() as scratch:
        pair = image_text.resolve(model, Path(source), text, tokenizer, logit_scale, Path(scratch),
                                  facts.values.get("size"))  # fmt: skip
        if pair is None and baked is not None:
            raise OnnxcamError("--prompts bakes an image-text model's prompts: give its text tower with --text (or "
                               "the combined export)")  # fmt: skip
        if pair is not None and task not in (None, "classification" if baked else "similarity"):
            raise OnnxcamError(f"an image-text model is explained by its prompts: drop --task {task}")
        if pair is not None:
            model = image_text.bake_prompts(pair, baked, Path(scratch)) if baked else pair.image
            task = "classification" if baked else "similarity"
            _describe_pair(pair, baked, notes)
        return _graft_loaded(model, facts, Path(source), out, layer, score, task, layout, box_format, background,
                             windowed, notes, None if baked else pair, Path(scratch), pixels)  # fmt: skip


def _describe_pair(pair: image_text.ImageText, baked: list[str] | None, notes: list[str]) -> None:
    where = "; ".join(f"{fact}: {found}" for fact, found in pair.sources.items())
    if baked:
        notes.append(f"an image-text model: {len(baked)} prompts baked in, a zero-shot classifier of them, each "
                     f"logit {pair.scale:g} x the cosine of the image's and the prompt's embeddings ({where})")
    else:
        notes.append(f"an image-text model: the text tower and tokenizer are written beside the file, each prompt's "
                     f"logit {pair.scale:g} x the cosine of the embeddings (explain --prompt; {where})")


def _graft_loaded(
    model: onnx.ModelProto, facts: Facts, source: Path, out: Path, layer: str | None, score: str, task: str | None,
    layout: str | None, box_format: str | None, background: int | None, windowed: bool, notes: list[str],
    pair: image_text.ImageText | None, scratch: Path, pixels: bool = False,
) -> tuple[dict[str, object], list[str]]:  # fmt: skip
    """:func:`graft_file` from the loaded model on (``pair``: an image-text model's, its text tower in
    ``scratch``)."""
    inputs = _input_layout(model.graph, facts, notes)
    prep = _resolve(facts, notes)
    _fold_shapes(model, inputs)
    types = _annotate_shapes(model, inputs)
    family = facts.values.get("family")
    decoding = Decoding((inputs.height, inputs.width), box_format, background, family,
                        *_extra_rows(model.graph, _shapes(types), facts))  # fmt: skip
    logits, found, classes = _task_logits(model, types, task, notes, decoding, layout, pair and pair.scale)
    if pair is not None:  # the model's own image-text logits, or their softmax over the prompts
        found = dataclasses.replace(found, explained=score)
    elif found.kind != "classification" and score != "logit":  # (a regressor's value is its "logit": as it is)
        raise OnnxcamError(f"a {found.kind} model explains its scores as they are: drop --score {score}")
    types = infer_types(model) if found.kind != "classification" else types
    layer, extras, layout = _choose_layers(model, Path(source), layer, logits, found, classes, types, inputs, notes)
    upgraded = _upgrade(model, layer, logits, notes)
    if upgraded is not model:
        model = upgraded
        _annotate_shapes(model, inputs)
    _prepend_preprocessing(model, inputs, prep)
    types = infer_types(model)  # once more: the model changed (opset, preprocessing in front)
    grafted, weights_path = _grafted(model, layer, logits, types, layout, score, found, extras, windowed, inputs,
                                     notes, pixels)  # fmt: skip
    shapes = _shapes(types)
    channels, h, w = layout.contract_dims(shapes[layer])
    names, labels_source = _labels(facts, classes, notes, background, found.background, found.kind)
    _warn_if_coarse((h, w), inputs, notes)
    described = "" if layout.channels_first else f" [{layout.describe(shapes[layer])}]"
    card = ModelCard(
        arch=f"onnx:{Path(source).name}",
        weights=f"{Path(source).name} (sha256 {file_digest(Path(source))[:16]})",
        layer=f"{layer} ({channels}x{h}x{w}){described}",
        input_size=(inputs.height, inputs.width),
        mean=prep.mean,
        std=prep.std,
        labels=tuple(names),
        weights_path=weights_path,
        saliency_methods=() if weights_path != "none" else tuple(in_graph(gradients=False)),
        score=found.explained or score,
        task=found.kind,
        background=found.background if found.background is not None else background,
        extra_layers=tuple(f"{name} ({'x'.join(str(d) for d in shapes[name][1:])})" for name in extras),
        notes="; ".join([*notes, f"the model receives {'BGR' if prep.bgr else 'RGB'} channels"]),
        resize=prep.resize.to_card(),
        sources=prep.sources | {"labels": labels_source} | (pair.sources if pair else {}),
        logit_scale=pair and pair.scale,
        text=_text_sidecars(pair, scratch, out),
    )
    try:
        card = save_explainer(grafted, card, out)
    except BaseException:
        for name in (card.text.get("model"), card.text.get("tokenizer")):
            if name:
                (out.parent / name).unlink(missing_ok=True)
        raise
    return card.summary(), notes


def _text_sidecars(pair: image_text.ImageText | None, scratch: Path, out: Path) -> dict:
    """An image-text model's text tower and tokenizer written beside ``out`` (``<name>.text.onnx``,
    ``<name>.tokenizer.json``): the card's ``text``, or {} for every other model."""
    if pair is None:
        return {}
    stem = out.name.removesuffix(".onnx")
    spec = pair.spec | {"model": f"{stem}.text.onnx", "tokenizer": f"{stem}.tokenizer.json"}
    out.parent.mkdir(parents=True, exist_ok=True)
    for given, name in ((pair.spec["model"], spec["model"]), (pair.spec["tokenizer"], spec["tokenizer"])):
        atomic_write(out.parent / name, lambda tmp, given=given: shutil.copyfile(scratch / given, tmp))
    return spec


def _check_options(score: str, task: str | None, layout: str | None, box_format: str | None) -> None:
    """Refuse the options that name nothing onnxcam knows, before any work."""
    if score not in SCORES:
        raise OnnxcamError(f"unknown score {score!r}; choose one of: {', '.join(SCORES)}")
    if task is not None and task not in TASKS:
        raise OnnxcamError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if layout is not None and layout not in DETECTOR_LAYOUTS:
        raise OnnxcamError(f"unknown detector layout {layout!r}; choose one of: {', '.join(DETECTOR_LAYOUTS)}")
    if layout is not None and task not in (None, "detection"):
        raise OnnxcamError(f"--detector-layout forces a detector: drop --task {task}")
    if box_format is not None and box_format not in BOX_FORMATS:
        raise OnnxcamError(f"unknown box format {box_format!r}; choose one of: {', '.join(BOX_FORMATS)}")


def _load_source(source: Path, given: Facts) -> tuple[onnx.ModelProto, Facts]:
    """The user's model at a modern IR version, its names cleared of the contract's, and what it says of itself
    merged under what the flags gave."""
    try:
        model = onnx.load(source)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise OnnxcamError(f"cannot read {source} as an ONNX model: {exc}") from exc
    if any(p.key == contract.META_PREFIX + "contract" for p in model.metadata_props):
        raise OnnxcamError(f"{source} is already an onnxcam model; give the original classifier")
    _check_opsets(model, source)
    _clear_names(model.graph)
    facts = Facts(dict(given.values), dict(given.sources)).merge(from_file(model, source))
    return _modern_ir(model), facts


def _choose_layers(
    model: onnx.ModelProto, source: Path, layer: str | None, logits: str, found: Task, classes: int, types: Types,
    inputs: InputLayout, notes: list[str],
) -> tuple[str, list[str], Layout]:  # fmt: skip
    """The target layer (``layer``, or the automatic one for the task), the extra ones (a detector's scales) and
    the first one's layout."""
    graph, shapes = model.graph, _shapes(types)
    layouts = infer_layouts(graph, shapes, inputs.name, inputs.channels_first, shapes[inputs.name][0])
    candidates = candidate_layers(graph, logits, layouts, types)  # (a Flatten added above is no candidate)
    if not candidates:
        raise OnnxcamError(f"{source} has no layer with a spatial grid (h, w >= 2) that all paths to the logits cross")
    layer, extras = _extra_layers(graph, layer, logits, candidates, layouts)
    if layer is None and found.kind != "classification":  # a detector's flattened [N, C, A] outputs are no tokens;
        # a transformer's, with tokens beside the grid (YOLOS's class and detection tokens), are
        candidates = [c for c in candidates if not layouts[c].has_tokens or layouts[c].prefix or layouts[c].suffix
                      ] or candidates  # fmt: skip
    if layer is None and found.kind == "segmentation":  # the masks and their upsampling are no features
        candidates = _before_masks(candidates, layouts, shapes, classes)
    heads = _detector_heads(graph, logits, found.anchor_axis, layouts, types) if layer is None and found.boxes else []
    if len(heads) > 1:
        layer, extras = heads[0], heads[1:]
        notes.append(f"target layers (auto): the detector's head inputs, one per scale: {', '.join(heads)}")
    if layer is None:
        layer = _auto_layer(model, logits, candidates, layouts, types, _feed(inputs, seed=0), found)
        notes.append(f"target layer (auto): {layer!r}, the last layer with a grid on the path to the logits that "
                     "the gradient reaches")  # fmt: skip
    elif not _check_layer(graph, layer, logits, candidates, layouts):
        notes.append(f"{layer!r} is not crossed by every path to the logits: its gradient is the partial derivative")
    if not layouts[layer].channels_first:
        notes.append(f"{layer!r} is a {layouts[layer].describe(shapes[layer])}")
    return layer, extras, layouts[layer]


def _grafted(
    model: onnx.ModelProto, layer: str, logits: str, types: Types, layout: Layout, score: str, found: Task,
    extras: list[str], windowed: bool, inputs: InputLayout, notes: list[str], pixels: bool = False,
) -> tuple[onnx.ModelProto, str]:  # fmt: skip
    """The grafted model and its ``weights_path``; a windowed walk is kept only where it equals the dense one. A
    classifier whose backward cannot be built (an op without a rule, control flow) gets a gradient-free file
    (:func:`graft_gradient_free`, ``weights_path`` none)."""
    try:
        result = graft(model, layer, logits, types, layout, score, found, extras, windowed, pixels)
        if result.walk != "windowed":
            return result.model, result.weights_path
        dense = graft(model, layer, logits, types, layout, score, found, extras, windowed=False, pixels=pixels).model
        return _checked_windows(result.model, dense, inputs, notes), result.weights_path
    except UnsupportedOp as exc:
        if pixels:  # (a gradient-free file has no backward to the input either)
            raise OnnxcamError(f"cannot build the gradient to the model's input (--pixels): {exc}") from exc
        if found.kind != "classification" or extras:
            raise OnnxcamError(f"cannot build the gradient for layer {layer!r}: {exc}") from exc
        why = exc
    try:
        model = graft_gradient_free(model, layer, logits, types, layout)
    except UnsupportedOp as exc:
        raise OnnxcamError(f"cannot build the gradient for layer {layer!r}: {why}; nor a gradient-free file: {exc}"
                           ) from exc  # fmt: skip
    short = re.split(r"; supported ops| Pick a", str(why))[0]  # (the op and the node; the list of rules is long)
    notes.append(f"warning: cannot build the gradient for layer {layer!r}: {short}; the file is gradient-free: it "
                 "carries ReciproCAM (the head run on each location of the layer alone), computed in the graph, and "
                 "explain uses it (also Score-CAM, Ablation-CAM, Eigen-CAM)")  # fmt: skip
    channels, height, width = layout.contract_dims(_shapes(types)[layer])
    megabytes = (height * width) ** 2 * channels * 4 / 2**20
    notes.append(f"ReciproCAM in the graph runs {height * width} mosaics of {channels}x{height}x{width} per image "
                 f"({megabytes:.0f} MB of float32 each image)")  # fmt: skip
    return model, "none"


def _warn_if_coarse(grid: tuple[int, int], inputs: InputLayout, notes: list[str]) -> None:
    """A warning where the target layer's grid is under 3x3, naming the input size that gives 7x7."""
    h, w = grid
    if min(h, w) < 3:
        better = "x".join(str(7 * round(side / cells)) for side, cells in ((inputs.height, h), (inputs.width, w)))
        notes.append(f"warning: the target layer's grid is {h}x{w} at the input size {inputs.height}x{inputs.width}, "
                     f"too coarse for a map: an input of {better} gives a 7x7 grid (--size, or re-export the model "
                     "at that size)")  # fmt: skip
