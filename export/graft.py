"""Graft Grad-CAM gradients into a forward ONNX graph (needs ``onnx`` only, never torch).

Given a classifier graph, the name of the target-layer tensor ``A`` and of the logits, the
reverse-mode walker (:mod:`onnxcam_export.walk`) applies one rule from :mod:`onnxcam_export.vjp` per node
of the head (the nodes on a path from ``A`` to the logits); this module seeds it, picks the walk (a
detector's windows, :mod:`onnxcam_export.windowed`; an FC head's presummed weight; the dense walk) and emits
the contract's inputs and outputs around it. The result obeys :mod:`onnxcam.contract`.

The per-channel weights ``alpha = mean_hw(dy/dA)`` take a cheap exact path when the head
starts with channel-wise, mass-preserving ops (MaxPool, average pools, Identity, Dropout)
followed by Flatten and a constant Gemm/MatMul: those ops only move gradient within a
channel, so ``sum_hw(dA) = dZ @ W_sum`` with ``W_sum`` the FC weight pre-summed over the
spatial positions (VGG16: 512x4096 instead of 25088x4096). The rest of the walk, from the
first FC node down to ``A`` (the full gradient tensor), then runs inside an ``If`` on
``full_gradients``, so the FC weight is read a second time only when a caller asks for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import onnx
import onnx.utils
from onnx import TensorProto, helper, numpy_helper

from onnxcam import contract
from onnxcam_export import saliency
from onnxcam_export import windowed as windows
from onnxcam_export.builder import Builder, Types, infer_types, make_node
from onnxcam_export.layouts import Layout
from onnxcam_export.ops import ops_with
from onnxcam_export.simplify import pick_tokens_early
from onnxcam_export.tasks import Task, add_detection_io, detection_seed, detection_targets, instance_masks
from onnxcam_export.vjp import GUIDED, UnsupportedOp, attrs
from onnxcam_export.walk import (
    SPATIAL,
    Branch,
    backward,
    check_rules,
    differentiable,
    expose_extra_outputs,
    extra_outputs,
    head_nodes,
    inputs_of,
    reached_gradient,
    static_tensors,
)

MASS_PRESERVING = ops_with("mass_preserving")  # their backward moves gradient within a channel, keeping its sum
HEAD_RUN_LOGITS = f"{contract.HEAD_LOGITS}/run"  # the logits of the head-only copy, inside its If

WALKS = ("windowed", "presummed", "dense")  # how graft() computed the weights (see Grafted)


class Grafted(NamedTuple):
    """:func:`graft`'s model and the walk that computed its weights: ``windowed`` (a detector's boxes over the
    windows their scores read, :mod:`onnxcam_export.windowed`), ``presummed`` (an FC head's weight summed over
    the positions) or ``dense`` (the whole backward, summed)."""

    model: onnx.ModelProto
    walk: str

    @property
    def weights_path(self) -> str:
        """The card's ``weights_path``: ``presummed``, or ``gradient-mean`` for the other walks."""
        return "presummed" if self.walk == "presummed" else "gradient-mean"


Presummed = tuple[onnx.NodeProto, np.ndarray]  # the first FC node, its weight summed over positions [F, C]
Adapt = Callable[[str], str]  # a tensor of the target layer (or its gradient) -> the contract's layout


def head_copy(
    graph: onnx.GraphProto, b: Builder, head: list[onnx.NodeProto], layer: str, layout: Layout | None,
    source: str = contract.HEAD_ACTIVATIONS, prefix: str = "head/", result: str = HEAD_RUN_LOGITS,
) -> list[onnx.NodeProto] | None:  # fmt: skip
    """The head's nodes again, reading ``source`` (``[M, C, h, w]`` in the contract's layout; default
    ``head_activations``) and writing ``result`` (default ``head_logits/run``), weights shared, its tensors named
    with ``prefix``.

    The copies leave out the outputs only a gradient rule reads. None when the head also reads
    tensors computed before the target layer (not a cut), or tokens the contract's activations lack.
    """
    with b.subgraph() as copies:
        start = source if layout is None else layout.adapter.from_contract(b, source, layout)
    if start is None:
        return None
    renamed = {layer: start} | {o: f"{prefix}{o}" for n in head for o in n.output if o}
    renamed[contract.LOGITS] = result
    static = static_tensors(graph)
    for node in head:
        if any(i not in renamed and i not in static for i in node.input):
            return None
        if set(inputs_of(node)[len(node.input) :]) & renamed.keys():  # a branch that reads a head tensor by name
            return None  # (the copy renames node inputs only: it would read the original)
        extra = range(1, 1 + len(extra_outputs(node)))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}{node.name or node.output[0]}"
        copy.input[:] = [renamed.get(i) or b.weight(i) for i in node.input]
        copy.output[:] = [renamed[o] if o else "" for i, o in enumerate(node.output) if i not in extra]
        copies.append(copy)
    return copies


def _consumers(head: list[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in head:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _preserves_mass(node: onnx.NodeProto) -> bool:
    a = attrs(node)
    if node.op_type == "AveragePool":
        padded = any(a.get("pads", [])) or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
        return not int(a.get("ceil_mode", 0)) and (not padded or not int(a.get("count_include_pad", 0)))
    return node.op_type in MASS_PRESERVING


def presummed_weight(b: Builder, head: list[onnx.NodeProto], activations: str) -> Presummed | None:
    """The first FC node and its weight summed over spatial positions ([F, C]), if the head allows."""
    users = _consumers(head)
    current = activations
    while len(users.get(current, [])) == 1 and _preserves_mass(users[current][0]):
        current = users[current][0].output[0]
    if len(users.get(current, [])) != 1 or users[current][0].op_type not in ("Flatten", "Reshape"):
        return None
    flatten = users[current][0]
    if flatten.op_type == "Flatten" and int(attrs(flatten).get("axis", 1)) != 1:
        return None
    shape_in, shape_out = b.shape(current), b.shape(flatten.output[0])
    if not shape_in or not shape_out or any(d is None for d in shape_in[1:]) or len(shape_out) != 2:
        return None
    channels, positions = shape_in[1], int(np.prod(shape_in[2:]))
    fc_users = users.get(flatten.output[0], [])
    if shape_out[1] != channels * positions or len(fc_users) != 1:
        return None
    fc = fc_users[0]
    if fc.op_type not in ("Gemm", "MatMul") or fc.input[0] != flatten.output[0]:  # (a Relu or Dropout first)
        return None
    weight = b.constant_value(fc.input[1])
    if weight is None or weight.ndim != 2:
        return None
    a = attrs(fc)
    if fc.op_type == "Gemm":
        if int(a.get("transA", 0)):
            return None
        weight = (weight.T if int(a.get("transB", 0)) else weight) * float(a.get("alpha", 1.0))
    # weight: [C*P, F] in Flatten's channel-major order -> sum over P -> [F, C]
    # (summed in float64 chunk by chunk: a float64 copy of tests/test_hostile.py's 2.3 GB weight took 4.6 GB more)
    summed = np.add.reduce(weight.reshape(channels, positions, -1), axis=1, dtype=np.float64).T
    return fc, summed.astype(weight.dtype)


def _resolve_targets(b: Builder, logits: str) -> str:
    """target_classes = targets where targets >= 0, else the (-targets)-th ranked class."""
    classes = b.dims(logits, 1, 2)
    ranked = b.op_multi("TopK", logits, classes, outputs=2, axis=1, largest=1, sorted=1)[1]
    zero, one = b.value(0), b.value(1)
    negative = b.op("Less", contract.TARGETS, zero)
    rank = b.op("Where", negative, b.op("Sub", b.op("Neg", contract.TARGETS), one), zero)  # -k -> k-1
    last = b.op("Sub", classes, one)
    rank = b.op("Where", b.op("Less", rank, classes), rank, last)  # (Where, not Min: int64 Min needs opset 12)
    picked = b.op("GatherElements", ranked, rank, axis=1)
    return b.op("Where", negative, picked, contract.TARGETS, name=contract.TARGET_CLASSES)


# -- the graph's new parts, each emitted by one function -------------------------------------------
def _seed(b: Builder, logits: str, score: str) -> str:
    """The gradient of the explained scores w.r.t. the logits, [N, T, K], for target classes c:

    logit: ``OneHot(c)``; probability ``p_c = softmax(logits)_c``: ``dp_c/dz = p_c (OneHot(c) - p)``.
    """
    target_classes = _resolve_targets(b, logits)
    classes = b.op("Reshape", b.dims(logits, 1, 2), b.ints([]))
    onehot = b.op("OneHot", target_classes, classes, b.const(np.asarray([0, 1], dtype=b.np_dtype(logits))), axis=-1)
    if score != "probability":  # a logit, or a regressor's value, as it is
        return onehot
    p = b.unsqueeze(b.op("Softmax", logits, axis=1 if b.opset >= 13 else -1), [1])  # [N, 1, K]
    p_c = b.reduce("ReduceSum", b.op("Mul", onehot, p), [2], keepdims=1)  # [N, T, 1]
    return b.op("Mul", p_c, b.op("Sub", onehot, p))


def _emit_activations(b: Builder, layer: str, adapt: Adapt) -> None:
    """activations = the target layer in the contract's [N, C, h, w] layout."""
    b.op("Identity", adapt(layer), name=contract.ACTIVATIONS)


def _emit_weights(b: Builder, summed: str) -> None:
    """weights = sum_hw(dy/dA) / (h * w), [N, T, C]."""
    plane = b.op("Cast", b.product(contract.ACTIVATIONS, 2), to=b.elem_type(contract.LOGITS))
    b.op("Div", summed, plane, name=contract.WEIGHTS)


def _emit_gradients(b: Builder, full: Branch, condition: str = contract.FULL_GRADIENTS) -> None:
    """gradients = the output of branch ``full`` when ``condition`` (``full_gradients``), else [N, T, C, 0, 0] zeros."""
    with b.subgraph() as nodes:
        shape = b.op("Concat", b.op("Shape", contract.WEIGHTS), b.ints([0] * len(SPATIAL)), axis=0)
        empty = (nodes, b.zeros(shape, like=contract.LOGITS))
    b.if_(condition, full, empty, contract.GRADIENTS, b.elem_type(contract.LOGITS))


def _add_head_only(graph: onnx.GraphProto, b: Builder, copies: list[onnx.NodeProto], dims: list[int]) -> None:
    """head_logits = the head run on head_activations, behind an If on run_head (false by default), so
    that ordinary calls never run it, whatever its reshapes need."""
    elem, classes = b.elem_type(contract.LOGITS), b.shape(contract.LOGITS)[1]
    with b.subgraph() as skipping:
        skipped = b.op("Identity", "head/none", name="head/skipped")
    head, no_head = (copies, HEAD_RUN_LOGITS), (skipping, skipped)
    b.if_(contract.RUN_HEAD, head, no_head, contract.HEAD_LOGITS, elem, into=graph.node)
    empty = np.zeros([0, *dims], dtype=b.np_dtype(contract.LOGITS))
    graph.input.append(helper.make_tensor_value_info(contract.HEAD_ACTIVATIONS, elem, ["M", *dims]))
    graph.initializer.append(numpy_helper.from_array(empty, contract.HEAD_ACTIVATIONS))
    graph.input.append(helper.make_tensor_value_info(contract.RUN_HEAD, TensorProto.BOOL, []))
    no_logits = numpy_helper.from_array(np.zeros([0, classes], dtype=b.np_dtype(contract.LOGITS)), "head/none")
    graph.initializer.extend([numpy_helper.from_array(np.asarray(False), contract.RUN_HEAD), no_logits])


def _add_contract_io(graph: onnx.GraphProto, b: Builder, dims: list[int], head_only: bool, attention: bool,
                     gradients: bool = True) -> None:  # fmt: skip
    """The contract's inputs targets and full_gradients, and its outputs in contract order (without
    ``gradients``: a gradient-free file's, its weights and gradients empty)."""
    elem, info = b.elem_type(contract.LOGITS), helper.make_tensor_value_info
    batch = b.shape(contract.LOGITS)[0] or "N"
    channels, classes, anchors = dims[0], b.shape(contract.LOGITS)[1], b.shape(contract.LOGITS)[2:]
    grid = [f"h{i}" for i in range(len(SPATIAL))] if gradients else [0] * len(SPATIAL)
    channels = channels if gradients else 0
    graph.input.append(info(contract.TARGETS, TensorProto.INT64, [batch, "T"]))
    graph.input.append(info(contract.FULL_GRADIENTS, TensorProto.BOOL, []))
    graph.initializer.append(numpy_helper.from_array(np.asarray(False), contract.FULL_GRADIENTS))
    del graph.output[:]
    graph.output.extend(
        [
            info(contract.LOGITS, elem, [batch, classes, *anchors]),  # a detector's: [N, K, A]
            info(contract.ACTIVATIONS, elem, [batch, *dims]),
            info(contract.WEIGHTS, elem, [batch, "T", channels]),
            info(contract.GRADIENTS, elem, [batch, "T", channels, *grid]),
            info(contract.TARGET_CLASSES, TensorProto.INT64, [batch, "T"]),
        ]
    )
    if head_only:
        graph.output.append(info(contract.HEAD_LOGITS, elem, ["M", classes]))
    if attention:
        axes = ["L", "heads", "tokens", "tokens"]
        graph.output.append(info(contract.ATTENTIONS, elem, [batch, *axes]))
        graph.output.append(info(contract.ATTENTION_GRADIENTS, elem, [batch, "T", *axes]))


def attention_probabilities(graph: onnx.GraphProto, b: Builder, layer: str) -> list[str]:
    """The outputs of the Softmax nodes that mix the tokens of ``layer`` ([N, heads, T, T], T its tokens),
    in graph order: each block's attention probabilities."""
    tokens = (b.shape(layer) or [None, None])[1]
    found = []
    for node in graph.node:
        shape = b.shape(node.output[0]) if node.op_type == "Softmax" else None
        if shape and len(shape) == 4 and shape[2] == shape[3] == tokens and b.same_dim(node.output[0], layer, 0):
            found.append(node.output[0])
    return found


def _emit_attention(graph: onnx.GraphProto, b: Builder, attentions: list[str], seed: str) -> bool:
    """attentions [N, L, H, T, T] behind an If on with_attentions, and their gradients [N, T, L, H, T, T]
    (a walk from the logits down to the first block) behind an If on with_attention_gradients.

    False (and nothing emitted) when an op on the way has no rule.
    """
    head = head_nodes(graph, set(attentions), contract.LOGITS)
    wanted = differentiable(head, set(attentions), b.types)
    try:
        check_rules(head, wanted)
    except UnsupportedOp:
        return False
    elem, outer = b.elem_type(contract.LOGITS), b.wanted
    with b.subgraph() as forward:
        stacked = b.op("Concat", *[b.unsqueeze(a, [1]) for a in attentions], axis=1)
    with b.subgraph() as backward_nodes:
        b.wanted = wanted
        grads = backward(b, head, {contract.LOGITS: [seed]})
        stacked_grads = b.op("Concat", *[b.unsqueeze(reached_gradient(b, grads, a), [2]) for a in attentions], axis=2)
    b.wanted = outer
    for flag, output, branch, lead in (
        (contract.WITH_ATTENTIONS, contract.ATTENTIONS, (forward, stacked), contract.LOGITS),
        (contract.WITH_ATTENTION_GRADIENTS, contract.ATTENTION_GRADIENTS, (backward_nodes, stacked_grads),
         contract.TARGET_CLASSES),
    ):  # fmt: skip
        with b.subgraph() as nodes:
            shape = b.op("Concat", b.dims(lead, 0, 1 if lead == contract.LOGITS else 2), b.ints([0] * 4), axis=0)
            empty = (nodes, b.zeros(shape, like=contract.LOGITS))
        b.if_(flag, branch, empty, output, elem)
        graph.input.append(helper.make_tensor_value_info(flag, TensorProto.BOOL, []))
        graph.initializer.append(numpy_helper.from_array(np.asarray(False), flag))
    return True


def _times_weight(b: Builder, grad: str, weight: str) -> str:
    """``grad @ weight``; where ``grad`` is the one-hot seed itself (the FC makes the logits, the score is the
    logit), the rows of the target classes instead: EfficientNet-Lite0's FC weight is 5 MB, which a MatMul
    reads whole for every call (8% of its forward at batch 1: benchmarks/latency.py)."""
    seed = next((n for n in b.nodes if grad in n.output), None)
    if seed is not None and seed.op_type == "OneHot" and int(attrs(seed).get("axis", -1)) == -1:
        off_on = b.constant_value(seed.input[2])
        if off_on is not None and off_on.tolist() == [0, 1]:
            return b.op("Gather", weight, seed.input[0], axis=0)
    return b.op("MatMul", grad, weight)


# -- the graft as a plan of parts: its state, the walks tried in order, the emitters ---------------------------
@dataclass
class _Graft:
    """One graft's state, which its walks and emitters share: the copy being grafted, its builder and head, the
    target layer (renamed to ``activations`` where NCHW), its layout (None: NCHW) and the task."""

    out: onnx.ModelProto
    b: Builder
    head: list[onnx.NodeProto]
    layer: str
    layout: Layout | None
    dims: list[int]  # [C, h, w] of the contract's activations
    adapt: Adapt  # the target layer's gradient -> the contract's layout
    task: Task
    score: str
    extra_layers: tuple[str, ...]
    windowed: bool
    head_only: list[onnx.NodeProto] | None  # the head's copy for head-only passes (classifiers), or None
    targets: tuple[str, str] | None  # a detector's flat target indices and their validity, else None
    pixels: tuple[str, bool, str] | None = None  # the model's float input, whether it is channels-first, and what
    # the model reads instead (_steered_pixels), where the backward is grafted down to it (pixel attributions)
    attention: bool = False  # whether the attention outputs were emitted

    @cached_property
    def body(self) -> list[onnx.NodeProto]:
        """The nodes on a path from the model's float input to the logits (the backward to the input walks them)."""
        return head_nodes(self.graph, self.pixels[2], contract.LOGITS) if self.pixels else []

    @property
    def graph(self) -> onnx.GraphProto:
        return self.out.graph

    @property
    def layers(self) -> list[str]:
        return [self.layer, *self.extra_layers]

    @cached_property
    def seed(self) -> str:
        """d(explained scores)/d(logits) ``[N, T, ...]``, built once, from :data:`SEEDS` by task kind."""
        return SEEDS[self.task.kind](self)

    @cached_property
    def grids(self) -> list[tuple]:
        """The ``(h, w)`` of every target layer where there are several (their maps meet at the finest), else none."""
        return [tuple(self.b.shape(name)[2:]) for name in self.layers] if self.extra_layers else []

    @cached_property
    def saliency_size(self) -> tuple[int, int] | None:
        """The input size the in-graph map takes; None where it cannot be built (several layers of unknown
        grids: their maps meet at the finest, chosen here; no uint8 image input)."""
        return _input_size(self.b) if all(isinstance(d, int) for grid in self.grids for d in grid) else None

    @cached_property
    def gradients_condition(self) -> str:
        """When the full gradients are built: ``full_gradients``, or a saliency call whose method reads them."""
        return contract.FULL_GRADIENTS if self.saliency_size is None else saliency.gradients_condition(self.b)


def _renamed_copy(
    model: onnx.ModelProto, activations: str, logits: str, types: Types | None, layout: Layout | None
) -> tuple[onnx.ModelProto, str, Layout | None, Types | None]:
    """A copy of ``model`` with the logits named ``logits`` and the target layer ``activations`` (where NCHW; a
    layout's tensor keeps its name), the layer's name, its layout (None: NCHW) and ``types`` renamed alike."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    layout = None if layout is None or layout.channels_first else layout
    layer = contract.ACTIVATIONS if layout is None else activations
    for tensor, name in ((activations, layer), (logits, contract.LOGITS)):
        renamed = rename_tensor(out.graph, tensor, name)
        types = None if types is None else {renamed.get(t, t): value for t, value in types.items()}
    return out, layer, layout, types


def model_pixels(graph: onnx.GraphProto) -> tuple[str, bool]:
    """The model's float input after the in-graph preprocessing (where Captum takes its input) and whether it is
    channels-first: the end of the chain of element-wise casts, channel gathers, the one transpose and the affine
    normalisation that starts at the uint8 ``image`` input (as onnxcam export puts it in front of every model)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    current, channels_first = contract.IMAGE, False
    while len(readers.get(current, [])) == 1 and readers[current][0].op_type in PREPROCESSING:
        node = readers[current][0]
        channels_first |= node.op_type == "Transpose" and list(attrs(node).get("perm", [])) == [0, 3, 1, 2]
        current = node.output[0]
    if current == contract.IMAGE:
        raise UnsupportedOp(f"no float input follows the {contract.IMAGE!r} input")
    return current, channels_first


PREPROCESSING = ("Cast", "Gather", "Transpose", "Sub", "Div", "Mul", "Add")  # (uint8 image -> the model's input)


def _steered_pixels(graph: onnx.GraphProto, pixels: str, channels_first: bool) -> str:
    """What the model reads instead of its input ``pixels``: ``baselines + alphas * (pixels - baselines) + noise``
    (the inputs :data:`contract.PIXEL_ALPHAS` ``[N]``, and :data:`contract.PIXEL_BASELINES`,
    :data:`contract.PIXEL_NOISE` ``[N or 1, C, H, W]`` channels-first), emitted right after ``pixels`` is made;
    the name of the result. Required inputs: JavaScript's ONNX Runtime cannot override a default."""
    steered = f"{contract.PIXELS}/steered"
    layout = [] if channels_first else [("Transpose", {"perm": [0, 2, 3, 1]})]
    names = {k: f"onnxcam/pixels/{k}" for k in ("baseline", "noise", "alpha", "shape", "delta", "scaled", "sum")}
    nodes = [make_node("Constant", [], [names["shape"]], value=numpy_helper.from_array(np.array([-1, 1, 1, 1])))]
    nodes += [make_node("Reshape", [contract.PIXEL_ALPHAS, names["shape"]], [names["alpha"]])]
    for key, given in (("baseline", contract.PIXEL_BASELINES), ("noise", contract.PIXEL_NOISE)):
        nodes += [make_node(op, [given], [names[key]], **a) for op, a in layout] or [
            make_node("Identity", [given], [names[key]])]
    nodes += [make_node("Sub", [pixels, names["baseline"]], [names["delta"]]),
              make_node("Mul", [names["alpha"], names["delta"]], [names["scaled"]]),
              make_node("Add", [names["baseline"], names["scaled"]], [names["sum"]]),
              make_node("Add", [names["sum"], names["noise"]], [steered])]  # fmt: skip
    for node in graph.node:  # (the model's nodes read the steered input)
        node.input[:] = [steered if name == pixels else name for name in node.input]
    made = next(i for i, n in enumerate(graph.node) if pixels in n.output)
    for k, node in enumerate(nodes, start=made + 1):
        graph.node.insert(k, node)
    float_input = helper.make_tensor_value_info
    graph.input.extend([float_input(contract.PIXEL_ALPHAS, TensorProto.FLOAT, ["M"]),
                        float_input(contract.PIXEL_BASELINES, TensorProto.FLOAT, ["B", "C", "H", "W"]),
                        float_input(contract.PIXEL_NOISE, TensorProto.FLOAT, ["E", "C", "H", "W"])])  # fmt: skip
    return steered


def _start(
    model: onnx.ModelProto, activations: str, logits: str, types: Types | None, layout: Layout | None, score: str,
    task: Task, extra_layers: tuple[str, ...], windowed: bool, pixels: bool = False,
) -> _Graft:  # fmt: skip
    """A copy of ``model`` with the target layer and the logits renamed to the contract's names, its head found
    and checked for rules, and what every walk reads prepared (the layout's adapters, a detector's targets).
    ``pixels``: the backward goes on to the model's float input (:func:`model_pixels`), its nodes checked too."""
    out, layer, layout, types = _renamed_copy(model, activations, logits, types, layout)
    graph = out.graph
    sources = {layer, *extra_layers}
    head = head_nodes(graph, sources, contract.LOGITS)
    check_rules(head, differentiable(head, sources, types, contract.LOGITS))  # before shape inference (may fail)
    found = model_pixels(graph) if pixels else None
    if found:
        found = (found[0], found[1], _steered_pixels(graph, *found))
        types = infer_types(out)  # (the steered input is new)
        body = head_nodes(graph, found[2], contract.LOGITS)
        check_rules(body, differentiable(body, {found[2]}, types, contract.LOGITS))
    types = types or infer_types(out)
    if pick_tokens_early(out, types, sources):  # (a ViT's class token before its last MLP)
        types = infer_types(out)
        head = head_nodes(graph, sources, contract.LOGITS)
    b = Builder(out, types)
    b.wanted = differentiable(head, sources, b.types, contract.LOGITS)
    b.static = static_tensors(graph)
    classifier = task.kind == "classification"  # (head-only passes are for classifiers)
    head_only = head_copy(graph, b, head, layer, layout) if classifier and not extra_layers else None
    expose_extra_outputs(head)
    if found:  # (the body's MaxPools need their Indices too)
        expose_extra_outputs(head_nodes(graph, found[2], contract.LOGITS))
    if layout is None:
        dims, adapt = b.shape(layer)[1:], (lambda x: x)
    else:
        dims = layout.contract_dims(b.shape(layer))
        _emit_activations(b, layer, lambda x: layout.adapter.to_contract(b, x, layout, 1))
        adapt = lambda g: layout.adapter.to_contract(b, g, layout, 2)  # noqa: E731
    targets = detection_targets(b, task.ranked, task.boxes, task.every_class) if task.kind == "detection" else None
    if task.protos is not None:
        instance_masks(b, task.protos, *targets)
    return _Graft(out, b, head, layer, layout, dims, adapt, task, score, extra_layers, windowed, head_only, targets,
                  found)  # fmt: skip


SEEDS: dict[str, Callable[[_Graft], str]] = {  # the gradient of the explained scores w.r.t. the logits, by task
    "classification": lambda g: _seed(g.b, contract.LOGITS, g.score),
    "segmentation": lambda g: _seed(g.b, contract.LOGITS, g.score),
    "recognition": lambda g: _seed(g.b, contract.LOGITS, g.score),
    "regression": lambda g: _seed(g.b, contract.LOGITS, g.score),
    "similarity": lambda g: _seed(g.b, contract.LOGITS, g.score),
    "detection": lambda g: detection_seed(g.b, contract.LOGITS, *g.targets),
}


@dataclass(frozen=True)
class _Walked:
    """What a walk built: ``sum_hw(dy/dA)`` ``[N, T, C]``, the If branch that builds the full gradient, and
    the same pair for each extra layer."""

    walk: str  # one of WALKS
    summed: str
    full: Branch
    extras: list[tuple[str, Branch]]


def _windowed_walk(g: _Graft) -> _Walked | None:
    """A detector's backward box by box over the windows its scores read (:mod:`onnxcam_export.windowed`)."""
    if g.targets is None or not g.windowed or g.layout is not None:
        return None
    cut = windows.cut(g.graph, g.head, g.layers, g.b)
    if cut is None:
        return None
    sums, branches = windows.walk(g.b, cut, *g.targets, g.layers)
    return _Walked("windowed", sums[0], branches[0], list(zip(sums[1:], branches[1:], strict=True)))


def _presummed_walk(g: _Graft) -> _Walked | None:
    """An FC head's cheap exact path: ``sum_hw(dA) = dZ @ W_sum``; the walk through the FC and below moves into
    the If that builds the full gradient."""
    presummed = presummed_weight(g.b, g.head, g.layer) if g.layout is None and not g.extra_layers else None
    if presummed is None:
        return None
    b, (fc, weight) = g.b, presummed
    cut = g.head.index(fc) + 1
    grads = backward(b, g.head[cut:], {contract.LOGITS: [g.seed]})
    summed = _times_weight(b, reached_gradient(b, grads, fc.output[0]), b.const(weight, "fc_weight_presummed"))
    with b.subgraph() as nodes:
        gradients = g.adapt(reached_gradient(b, backward(b, g.head[:cut], grads), g.layer))
    return _Walked("presummed", summed, (nodes, gradients), [])


def _dense_walk(g: _Graft) -> _Walked:
    """The whole backward, its full gradient summed (computed outside the If, which passes it on)."""
    b = g.b
    grads = backward(b, g.head, {contract.LOGITS: [g.seed]})
    gradients = g.adapt(reached_gradient(b, grads, g.layer))
    extras = [reached_gradient(b, grads, name) for name in g.extra_layers]
    summed = [b.reduce("ReduceSum", x, SPATIAL, keepdims=0) for x in [gradients, *extras]]
    return _Walked("dense", summed[0], _identity_branch(b, gradients),
                   [(s, _identity_branch(b, x)) for s, x in zip(summed[1:], extras, strict=True)])  # fmt: skip


WALK_STRATEGIES = (_windowed_walk, _presummed_walk, _dense_walk)  # tried in order; the first that applies runs


# the emitters, in order: each knows when it applies
def _weights_part(g: _Graft, w: _Walked) -> None:
    _emit_weights(g.b, w.summed)


def _gradients_part(g: _Graft, w: _Walked) -> None:
    _emit_gradients(g.b, w.full, g.gradients_condition)
    _emit_scales(g.b, g.extra_layers, w.extras, g.gradients_condition)


def _saliency_part(g: _Graft, w: _Walked) -> None:
    if g.saliency_size is not None:
        saliency.add_saliency(g.graph, g.b, g.saliency_size, g.grids)


def _pixels_part(g: _Graft, w: _Walked) -> None:
    """The model's float input (``pixels``, channels-first) and, when ``return_pixels``, the explained scores'
    gradient at it: the whole backward from the logits, in its own ``If`` (a CAM call builds none of it); when
    ``return_guided``, Guided Backpropagation's backward there (:data:`onnxcam_export.vjp.GUIDED`), in another."""
    if g.pixels is None:
        return
    b, (pixels, channels_first, steered) = g.b, g.pixels
    first = (lambda x, extra: x) if channels_first else (
        lambda x, extra: b.op("Transpose", x, perm=[0, *range(1, extra + 1), extra + 3, extra + 1, extra + 2]))
    b.op("Identity", first(pixels, 0), name=contract.PIXELS)
    seed = g.seed  # (built outside the branches: a walk that needed none, the windowed one, has not built it)
    wanted, b.wanted = b.wanted, differentiable(g.body, {steered}, b.types, contract.LOGITS)
    for condition, output, rules in ((contract.RETURN_PIXELS, contract.PIXEL_GRADIENTS, None),
                                     (contract.RETURN_GUIDED, contract.GUIDED_GRADIENTS, GUIDED)):  # fmt: skip
        with b.subgraph() as nodes:  # (the gradient at what the model read: at each row's steered input)
            found = first(reached_gradient(b, backward(b, g.body, {contract.LOGITS: [seed]}, rules), steered), 1)
        with b.subgraph() as empty:
            shape = b.op("Concat", b.op("Slice", b.op("Shape", seed), [0], [2]), b.ints([0, 0, 0]), axis=0)
            none = b.zeros(shape, like=contract.LOGITS)
        b.if_(condition, (nodes, found), (empty, none), output, b.elem_type(contract.LOGITS))
    b.wanted = wanted


def _attention_part(g: _Graft, w: _Walked) -> None:
    if g.layout is not None and g.layout.has_tokens and not g.layout.suffix:  # (rollout reads P + h*w tokens)
        attentions = attention_probabilities(g.graph, g.b, g.layer)
        g.attention = bool(attentions) and _emit_attention(g.graph, g.b, attentions, g.seed)


def _flush_part(g: _Graft, w: _Walked) -> None:
    g.graph.node.extend(g.b.nodes)
    g.graph.initializer.extend(g.b.initializers)


def _io_part(g: _Graft, w: _Walked) -> None:
    """The contract's inputs and outputs, and each family's own (head-only, detection, scales, task, saliency)."""
    graph, b = g.graph, g.b
    if g.head_only is not None:
        _add_head_only(graph, b, g.head_only, g.dims)
    _add_contract_io(graph, b, g.dims, g.head_only is not None, g.attention)
    if g.task.kind == "detection":
        add_detection_io(graph, b, g.task.nms)
    if g.task.protos is not None:
        batch, (_, _, height, width) = b.shape(contract.LOGITS)[0] or "N", b.shape(g.task.protos)
        graph.output.append(helper.make_tensor_value_info(contract.INSTANCE_MASKS, b.elem_type(contract.LOGITS),
                                                          [batch, "T", height, width]))  # fmt: skip
    _add_scale_io(graph, b, g.extra_layers)
    _add_task_outputs(graph, b, g.task.outputs)
    if g.pixels is not None:  # (a required input: JavaScript's ONNX Runtime cannot override a default)
        elem, info, batch = b.elem_type(contract.LOGITS), helper.make_tensor_value_info, b.shape(contract.LOGITS)[0]
        graph.input.extend(info(n, TensorProto.BOOL, []) for n in (contract.RETURN_PIXELS, contract.RETURN_GUIDED))
        graph.output.extend([info(contract.PIXELS, elem, [batch or "N", "C", "H", "W"]),
                             *(info(name, elem, [batch or "N", "T", "c", "h", "w"])
                               for name in (contract.PIXEL_GRADIENTS, contract.GUIDED_GRADIENTS))])  # fmt: skip
    if g.saliency_size is not None:
        _add_saliency_output(graph, b)


EMITTERS = (_weights_part, _gradients_part, _saliency_part, _pixels_part, _attention_part, _flush_part, _io_part)


def graft(
    model: onnx.ModelProto,
    activations: str,
    logits: str,
    types: Types | None = None,
    layout: Layout | None = None,
    score: str = "logit",
    task: Task | None = None,
    extra_layers: Sequence[str] = (),
    windowed: bool = True,
    pixels: bool = False,
) -> Grafted:
    """A copy of ``model`` obeying the onnxcam contract, and the walk that computed its weights.

    ``activations`` is the target layer: ``[N, C, h, w]``, or any :mod:`layouts` entry given as
    ``layout``. ``score``: the explained score, ``logit`` or ``probability`` (softmax of the logits).
    ``types``: :func:`infer_types` of ``model`` where the caller has it. ``task``: a detector's
    (:mod:`onnxcam_export.tasks`) has class scores ``[N, K, A]`` as ``logits`` and boxes.
    ``extra_layers``: more ``[N, C, h, w]`` target layers (a detector's scales), each with its own
    activations, weights and gradients outputs (:func:`contract.scale_output`), which its in-graph saliency
    aggregates; such a file has no head-only graph. ``windowed``: a detector's backward box by box over the
    windows its scores read (:mod:`onnxcam_export.windowed`) where its head allows, else over whole maps.
    ``pixels``: the backward also goes on to the model's float input (:func:`model_pixels`, after the in-graph
    normalisation), for pixel attributions: the ``pixels``, ``pixel_gradients`` and ``guided_gradients`` outputs,
    the latter two built when the ``return_pixels`` and ``return_guided`` inputs say so; every op on the way needs
    a rule.

    The plan: :func:`_start` prepares the copy, the first of :data:`WALK_STRATEGIES` that applies walks it
    back, and each of :data:`EMITTERS` adds its part. A new family adds a :data:`SEEDS` row and an emitter.
    """
    g = _start(model, activations, logits, types, layout, score, task or Task(), tuple(extra_layers), windowed,
               pixels)  # fmt: skip
    walked = next(w for w in (walk(g) for walk in WALK_STRATEGIES) if w is not None)
    for emit in EMITTERS:
        emit(g, walked)
    return Grafted(g.out, walked.walk)


def graft_gradient_free(
    model: onnx.ModelProto, activations: str, logits: str, types: Types | None = None, layout: Layout | None = None
) -> onnx.ModelProto:
    """A classifier's file for a head whose backward cannot be built (an op without a rule, control flow): the
    contract's outputs with ``weights`` ``[N, T, 0]`` and ``gradients`` ``[N, T, 0, 0, 0]`` (the card's
    ``weights_path`` is ``none``), the head-only graph (for ReciproCAM, Score-CAM and Ablation-CAM in Python),
    and ReciproCAM's finished map as the ``saliency`` output (:func:`_reciprocam`), for hosts without Python."""
    out, layer, layout, types = _renamed_copy(model, activations, logits, types, layout)
    graph = out.graph
    head = head_nodes(graph, {layer}, contract.LOGITS)
    b = Builder(out, types)
    copies = head_copy(graph, b, head, layer, layout)
    if copies is None:
        raise UnsupportedOp("the head cannot run alone (ReciproCAM's passes): it is not a cut of the graph, or a "
                            "branch reads its tensors by name")  # fmt: skip
    if layout is None:
        dims = b.shape(layer)[1:]
    else:
        dims = layout.contract_dims(b.shape(layer))
        _emit_activations(b, layer, lambda x: layout.adapter.to_contract(b, x, layout, 1))
    if not all(isinstance(d, int) for d in dims):
        raise UnsupportedOp(f"the target layer's shape {dims} is not fixed, which ReciproCAM's mosaics need")
    if isinstance((b.shape(contract.IMAGE) or [None])[0], int):
        raise UnsupportedOp("the model takes a fixed batch, and ReciproCAM runs its h * w mosaics of each image as "
                            "one batch through the head: export the model with a dynamic batch")  # fmt: skip
    _resolve_targets(b, contract.LOGITS)
    for name, rank in ((contract.WEIGHTS, 3), (contract.GRADIENTS, 5)):  # empty: no backward
        shape = b.op("Concat", b.dims(contract.TARGET_CLASSES, 0, 2), b.ints([0] * (rank - 2)), axis=0)
        b.op("Identity", b.zeros(shape, like=contract.LOGITS), name=name)
    size = _input_size(b)
    if size is None:
        raise UnsupportedOp("the model has no image input of a fixed size, which the in-graph map takes")
    _reciprocam(graph, b, head, layer, layout, dims, size)
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.initializers)
    _add_head_only(graph, b, copies, dims)
    _add_contract_io(graph, b, dims, head_only=True, attention=False, gradients=False)
    _add_saliency_output(graph, b)
    return out


def _reciprocam(
    graph: onnx.GraphProto, b: Builder, head: list[onnx.NodeProto], layer: str, layout: Layout | None,
    dims: list[int], size: tuple[int, int],
) -> None:  # fmt: skip
    """The ``saliency`` output of a gradient-free file: ReciproCAM (Byun & Lee, 2022) as
    :func:`onnxcam.passes.reciprocam_maps` computes it, in one batch. Each location (i, j) of the activations
    ``A [N, C, h, w]`` kept alone (a mosaic: every channel there, zeros elsewhere), the N * h * w mosaics through a
    copy of the head, the map of target class c at (i, j) its softmax probability on that mosaic; finished as
    every in-graph map (:mod:`onnxcam_export.saliency`). Behind an ``If`` on ``return_saliency``."""
    channels, height, width = dims
    cells = height * width
    with b.subgraph() as then_nodes:
        alone = np.eye(cells, dtype=b.np_dtype(contract.ACTIVATIONS)).reshape(1, cells, 1, height, width)
        mosaics = b.op("Mul", b.unsqueeze(contract.ACTIVATIONS, [1]), b.const(alone, "reciprocam/alone"))
        mosaics = b.op("Reshape", mosaics, b.ints([-1, channels, height, width]))  # [N * h * w, C, h, w]
        scores = "reciprocam/logits"
        b.nodes.extend(head_copy(graph, b, head, layer, layout, mosaics, "reciprocam/", scores))
        per_image = b.op("Concat", b.dims(contract.ACTIVATIONS, 0, 1), b.ints([cells]), b.dims(contract.LOGITS, 1, 2),
                         axis=0)  # fmt: skip
        as_float64 = b.op("Cast", b.op("Reshape", scores, per_image), to=TensorProto.DOUBLE)  # (as the Python path)
        probs = b.op("Softmax", as_float64, axis=2)  # [N, h * w, K]
        index = b.op("Expand", b.unsqueeze(contract.TARGET_CLASSES, [1]), b.op(
            "Concat", b.dims(contract.ACTIVATIONS, 0, 1), b.ints([cells]), b.dims(contract.TARGET_CLASSES, 1, 2),
            axis=0))  # fmt: skip
        picked = b.op("Transpose", b.op("GatherElements", probs, index, axis=2), perm=[0, 2, 1])  # [N, T, h * w]
        cam = b.op("Reshape", picked, b.op("Concat", b.dims(contract.TARGET_CLASSES, 0, 2),
                                           b.ints([height, width]), axis=0))  # fmt: skip
        finished = saliency.finish(b, cam, size)
    saliency.emit_saliency(graph, b, (then_nodes, finished))


def _add_task_outputs(graph: onnx.GraphProto, b: Builder, names: Sequence[str]) -> None:
    """A task's own ``[N, K]`` outputs (a segmenter's pixel shares, a recogniser's characters), in the graph
    already, declared."""
    batch, classes = b.shape(contract.LOGITS)[0] or "N", b.shape(contract.LOGITS)[1]
    for n in names:  # [N, K], or its own width (a similarity model's embeddings [N, D])
        width = (b.shape(n) or [None, None])[1] if n == contract.EMBEDDINGS else classes
        graph.output.append(helper.make_tensor_value_info(n, b.elem_type(n), [batch, width]))


def _identity_branch(b: Builder, grad: str) -> Branch:
    """An If branch that returns ``grad``, computed outside it."""
    with b.subgraph() as nodes:
        inside = b.op("Identity", grad, name=grad + "/full")
    return nodes, inside


def _emit_scales(
    b: Builder, layers: Sequence[str], extras: Sequence[tuple[str, Branch]], condition: str = contract.FULL_GRADIENTS
) -> None:
    """activations/i, weights/i = mean_hw(dy/dA_i) and gradients/i (built when ``condition``: ``full_gradients``)
    of each extra layer, given its ``sum_hw(dy/dA_i)`` and the branch that builds its full gradient."""
    for i, (layer, (summed, full)) in enumerate(zip(layers, extras, strict=True), start=1):
        names = {key: contract.scale_output(key, i) for key in (contract.ACTIVATIONS, contract.WEIGHTS)}
        b.op("Identity", layer, name=names[contract.ACTIVATIONS])
        plane = b.op("Cast", b.product(layer, 2), to=b.elem_type(contract.LOGITS))
        b.op("Div", summed, plane, name=names[contract.WEIGHTS])
        with b.subgraph() as nodes:
            shape = b.op("Concat", b.op("Shape", names[contract.WEIGHTS]), b.ints([0] * len(SPATIAL)), axis=0)
            empty = (nodes, b.zeros(shape, like=contract.LOGITS))
        b.if_(condition, full, empty, contract.scale_output(contract.GRADIENTS, i), b.elem_type(contract.LOGITS))


def _add_scale_io(graph: onnx.GraphProto, b: Builder, layers: Sequence[str]) -> None:
    """The outputs of :func:`_emit_scales`."""
    elem, info = b.elem_type(contract.LOGITS), helper.make_tensor_value_info
    batch = b.shape(contract.LOGITS)[0] or "N"
    for i, layer in enumerate(layers, start=1):
        channels, *grid = b.shape(layer)[1:]
        graph.output.extend([
            info(contract.scale_output(contract.ACTIVATIONS, i), elem, [batch, channels, *grid]),
            info(contract.scale_output(contract.WEIGHTS, i), elem, [batch, "T", channels]),
            info(contract.scale_output(contract.GRADIENTS, i), elem, [batch, "T", channels, f"h{i}_", f"w{i}_"]),
        ])  # fmt: skip


def _input_size(b: Builder) -> tuple[int, int] | None:
    """(H, W) of the ``image`` input [N, H, W, 3], which the saliency map takes; None without one (a
    graph grafted only to measure a candidate layer, before its uint8 input is put in front)."""
    shape = b.shape(contract.IMAGE)
    if not shape or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:3]):
        return None
    return shape[1], shape[2]


def _add_saliency_output(graph: onnx.GraphProto, b: Builder) -> None:
    """The ``saliency`` output, last: [N, T, H, W] when asked for, else [N, T, 0, 0]."""
    batch = b.shape(contract.LOGITS)[0] or "N"
    dims = [batch, "T", "saliency_h", "saliency_w"]
    graph.output.append(helper.make_tensor_value_info(contract.SALIENCY, TensorProto.FLOAT, dims))


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= _tensor_names(attr.g)
    return names


def _replace(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _replace(attr.g, old, new)
    for info in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        if info.name == old:
            info.name = new


def rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> dict[str, str]:
    """Give tensor ``old`` the name ``new`` everywhere; a tensor already called ``new`` moves aside.

    Returns the renames made, old name -> new name.
    """
    if old == new:
        return {}
    renames = {new: f"{new}/original"} if new in _tensor_names(graph) else {}
    renames[old] = new
    for before, after in renames.items():  # the tensor in the way first
        _replace(graph, before, after)
    return renames


def head_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """activations -> logits of an onnxcam model, as its own graph (for head-only passes)."""
    return onnx.utils.Extractor(model).extract_model([contract.ACTIVATIONS], [contract.LOGITS])
