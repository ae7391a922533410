"""The gradient check of files from other exporters, with onnx and numpy only (no torch): the grafted gradient of
target rows at the layer against a central finite difference of the file's own head (the nodes from the layer to
the explained scores, cut out of the grafted file and run in float64 by onnx's reference evaluator), in the
layer's own layout (tokens beside the grid unperturbed). Used by tests/test_corpus.py and tests/test_paddle.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from onnxcam import contract
from onnxcam.engine import Engine
from onnxcam_export.builder import infer_types
from onnxcam_export.walk import head_nodes, inputs_of


def as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph computing in float64: float weights, constants, casts and declared types (in branches too)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _graph_as_float64(out.graph)
    return out


def _graph_as_float64(graph: onnx.GraphProto) -> None:
    f, d = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
    for init in graph.initializer:
        if init.data_type == f:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for node in graph.node:
        for a in node.attribute:
            if a.name == "to" and a.i == f:
                a.i = d
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == f:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            if a.type == onnx.AttributeProto.GRAPH:  # an If's branches
                _graph_as_float64(a.g)
    for info in [*graph.input, *graph.output]:
        if info.type.tensor_type.elem_type == f:
            info.type.tensor_type.elem_type = d
    del graph.value_info[:]


def _layer(card: dict) -> tuple[str, re.Match | None]:
    """The target layer's tensor in the grafted file and, for a token layer, its description's numbers."""
    name = card["layer"].split(" (")[0]
    tokens = re.search(r"token layer: (\d+) \+ (\d+)(?: \+ (\d+))? tokens", card["layer"])
    return (contract.ACTIVATIONS if "[" not in card["layer"] else name), tokens


class GatherElements(OpRun):
    """onnx's reference GatherElements with ``take_along_axis`` (its ``np.choose`` takes at most 64 choices)."""

    op_domain = ""

    def _run(self, data: np.ndarray, indices: np.ndarray, axis: int = 0) -> tuple[np.ndarray]:
        return (np.take_along_axis(data, np.where(indices < 0, indices + data.shape[axis], indices), axis=axis),)


def _whole_map_pool(node: onnx.NodeProto, types: dict) -> onnx.NodeProto:
    """An AveragePool whose one window covers the whole map as the GlobalAveragePool it equals (onnx's reference
    builds a kernel-sized array: Hugging Face EfficientNet's 2560-wide pooler on a 7x7 map needed 125 GiB)."""
    if node.op_type != "AveragePool" or node.input[0] not in types:
        return node
    spatial = [d.dim_value for d in types[node.input[0]].shape.dim[2:]]
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    if any(a.get("pads", [0])) or not all(k >= n > 0 for k, n in zip(a["kernel_shape"], spatial, strict=True)):
        return node
    return onnx.helper.make_node("GlobalAveragePool", list(node.input[:1]), list(node.output[:1]), name=node.name)


def head_in_float64(model: onnx.ModelProto, layer: str, feeds: dict[str, np.ndarray]) -> Callable:
    """The nodes from ``layer`` to the explained scores (:func:`walk.head_nodes`, which follows the tensors an If
    branch reads), as a function of the layer in float64, run by onnx's reference evaluator; what else they read
    (shapes, the position embeddings made from the image, a segmenter's region) is taken from one ORT run."""
    graph, types = model.graph, infer_types(model)
    head = [_whole_map_pool(n, types) for n in head_nodes(graph, {layer}, contract.LOGITS)]
    made, weights = {o for n in head for o in n.output}, {i.name for i in graph.initializer}
    inputs = {i.name for i in graph.input}
    reads = list(dict.fromkeys(i for n in head for i in inputs_of(n) if i and i not in made | weights | {layer}))
    captured = [r for r in reads if r not in inputs]
    capture = onnx.ModelProto()
    capture.CopyFrom(model)
    del capture.graph.output[:]
    capture.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in [layer, *captured])
    session = ort.InferenceSession(capture.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([layer, *captured], session.run([layer, *captured], feeds), strict=True))
    values |= {r: feeds[r] if r in feeds else numpy_helper.to_array(next(
        i for i in graph.initializer if i.name == r)) for r in reads if r in inputs}  # fmt: skip
    values = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in values.items()}
    infos = [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
             for k, v in values.items()]  # fmt: skip
    cut = onnx.helper.make_graph(head, "head", infos, [onnx.helper.make_empty_tensor_value_info(contract.LOGITS)],
                                 list(graph.initializer))  # fmt: skip
    cut = as_float64(onnx.helper.make_model(cut, opset_imports=model.opset_import, ir_version=model.ir_version))
    for node in cut.graph.node:  # (the reference evaluator knows GridSample's modes by their opset-20 names)
        for a in node.attribute:
            if node.op_type == "GridSample" and a.name == "mode" and a.s in (b"bilinear", b"bicubic"):
                a.s = {b"bilinear": b"linear", b"bicubic": b"cubic"}[a.s]
    reference = ReferenceEvaluator(cut, new_ops=[GatherElements])
    base = values[layer]
    return base, lambda value: reference.run([contract.LOGITS], values | {layer: value})[0]


def finite_difference(path: Path, card: dict, image: np.ndarray, rows: np.ndarray) -> None:
    """<G, v> of two target rows against (f(L + eps V) - f(L - eps V)) / 2 eps, f the head in float64, V the
    direction v of the contract's [C, h, w] placed in the layer's layout (the tokens beside the grid left)."""
    engine = Engine(path)
    thresholds = {contract.CONF_THRESHOLD: 0.0} if card["task"] == "detection" else {}
    out = engine.run(image[None], rows, full_gradients=True, thresholds=thresholds)
    model = onnx.load(path)
    layer, tokens = _layer(card)
    inputs = {i.name for i in model.graph.input}
    feeds = {contract.IMAGE: image[None], contract.TARGETS: rows} | {k: v for k, v in {
        contract.RETURN_SALIENCY: np.asarray(False), contract.SALIENCY_METHOD: np.asarray(0, np.int64),
        contract.CONF_THRESHOLD: np.asarray(0.0, np.float32)}.items() if k in inputs}  # fmt: skip
    value, f = head_in_float64(model, layer, feeds)
    rng = np.random.default_rng(0)
    classes, anchors = out.target_classes[0], out.box_anchors
    for _ in range(2):
        v = rng.standard_normal(out.activations.shape[1:])  # [C, h, w]
        placed = np.zeros_like(value)
        if layer == contract.ACTIVATIONS:
            placed[0] = v
        elif tokens is None:  # channels last
            placed[0] = v.transpose(1, 2, 0)
        else:
            prefix = int(tokens.group(1))
            placed[0, prefix : prefix + v.shape[1] * v.shape[2]] = v.reshape(v.shape[0], -1).T
        # Richardson's extrapolation of central differences at steps of 1e-3 and 5e-4 of the layer's scale: their
        # O(eps^2) errors cancel, and the steps stay far above the rounding of the float32 constants the head
        # reads (at 1e-6, YOLOS's difference was off by 1e-2)
        # (a segmenter's scores sum over the pixels predicted as the class, which a large step moves: one step of
        # 1e-6, as tests/test_from_onnx.py takes)
        eps = (1e-6 if card["task"] == "segmentation" else 1e-3) * np.sqrt((value**2).mean() / (placed**2).mean())
        steps = [(f(value + e * placed) - f(value - e * placed)) / (2 * e) for e in (eps, eps / 2)]
        for t in range(rows.shape[1]):
            pick = (0, classes[t], anchors[0, t]) if card["task"] == "detection" else (0, classes[t])
            numeric = float(steps[0][pick]) if card["task"] == "segmentation" else (
                4 * float(steps[1][pick]) - float(steps[0][pick])) / 3  # fmt: skip
            analytic = float((out.gradients[0, t].astype(np.float64) * v).sum())
            scale = max(abs(analytic), np.abs(out.gradients[0, t]).sum() * np.abs(v).mean() * 1e-2)
            assert abs(numeric - analytic) <= 1e-4 * scale, f"row {t}: FD {numeric} vs <G, v> {analytic}"
