"""``onnxcam quantize``: an INT8 explainer from a float one (a build step: needs ``onnx`` and ONNX Runtime's tools).

The forward part (image -> logits, activations) is cut out of the explainer, statically
quantized by ONNX Runtime's own tool (``onnxruntime.quantization.quantize_static``: uint8
activations, int8 weights per output channel, MinMax calibration on the given photos), with
the head (target layer -> logits) kept in float but for its matrix products' weights, stored
as int8 levels (:func:`int8_head_weights`), and grafted again: the class gradient, the cheap
channel weights and the saliency map are computed in float from the INT8 backbone's
activations. The first Conv, the one that makes the target layer and the first depthwise block
stay float too (:func:`kept_in_float`). Pads computed from shapes (TF-style SAME padding) are made
constant first (:func:`static_pads`), so that ONNX Runtime folds them into the convolutions.
The file runs on the plain runtime install.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from onnxcam import contract
from onnxcam.contract import ModelCard
from onnxcam.errors import OnnxcamError
from onnxcam.image import read_rgb
from onnxcam.inputs import expand
from onnxcam_export.builder import make_node
from onnxcam_export.graft import graft
from onnxcam_export.ops import ops_with
from onnxcam_export.save import save_explainer
from onnxcam_export.simplify import static_pads
from onnxcam_export.vjp import attrs
from onnxcam_export.walk import head_nodes

# QDQ (default): QuantizeLinear/DequantizeLinear pairs around float ops, default-domain ONNX that any runtime
# reads, which ONNX Runtime fuses into int8 kernels; QOperator: ONNX Runtime's QLinear* ops, some of them in
# its com.microsoft domain. Both ran at the same speed here (benchmarks/int8.py).
FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}


class _Photos(CalibrationDataReader):
    """The calibration photos, one at a time, as the ``image`` input (uint8 RGB at the model's size, placed by
    the card's resize convention, as the deployed pipeline feeds them)."""

    def __init__(self, paths: list[Path], card: ModelCard) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = (
            {contract.IMAGE: card.resizing.apply(read_rgb(p), card.input_size)[0][None]} for p in paths
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _constant_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Identity nodes of a weight replaced by a copy of it: torch.onnx shares equal weights that way (VGG16's
    zero-initialised biases), and ONNX Runtime's quantizer wants a Conv's bias to be an initializer."""
    weights = {i.name: i for i in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in weights]:
        copy = onnx.TensorProto()
        copy.CopyFrom(weights[node.input[0]])
        copy.name = node.output[0]
        model.graph.initializer.append(copy)
        model.graph.node.remove(node)
    return model


def forward_graph(model: onnx.ModelProto, size: tuple[int, int]) -> onnx.ModelProto:
    """image -> (logits, activations) of an onnxcam model, pads static, every node named (the quantizer excludes
    by name)."""
    forward = _constant_identities(static_pads(model, size))
    for i, node in enumerate(forward.graph.node):
        node.name = node.name or f"node_{i}_{node.op_type}"
    return forward


ELEMENTWISE = ops_with("pointwise") & ops_with("unary")  # an activation or a batch norm after a conv


def kept_in_float(graph: onnx.GraphProto) -> list[str]:
    """The nodes left in float: the head (target layer -> logits: the gradient is taken there), the Conv that
    makes the target layer (its activations are what the maps weigh), the first Conv (it sees the image) and
    the first depthwise block (:func:`first_depthwise_block`).

    On EfficientNet-Lite0 over 52 scenes, keeping the first and the target convs in float lifts the top-1
    agreement with the float model from 92% to 94% and the worst map correlation from 0.975 to 0.989; the
    first depthwise block in float halves the RMS error of the logits (0.33 -> 0.16) at the same speed
    (benchmarks/int8.py).
    """
    producers = {o: n for n in graph.node for o in n.output}
    node = producers.get(contract.ACTIVATIONS)
    while node is not None and node.op_type in ELEMENTWISE:
        node = producers.get(node.input[0])
    first = next((n for n in graph.node if n.op_type == "Conv"), None)
    head = head_nodes(graph, contract.ACTIVATIONS, contract.LOGITS)
    kept = [*head, node, first, *first_depthwise_block(graph)]
    return [n.name for n in kept if n is not None and n.op_type != "Constant"]


def first_depthwise_block(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The first depthwise Conv (one group per channel) and the Conv that reads it (through elementwise ops),
    none in a model without one. In MobileNet-style models it runs at the first, largest resolution after the
    stem, where its int8 kernel was no faster here, and quantizing its output cost the most accuracy."""
    weights = {i.name: i for i in graph.initializer}
    depthwise = next((n for n in graph.node if n.op_type == "Conv" and _is_depthwise(n, weights)), None)
    if depthwise is None:
        return []
    readers = {i: n for n in graph.node for i in n.input}
    node = readers.get(depthwise.output[0])
    while node is not None and node.op_type in ELEMENTWISE:
        node = readers.get(node.output[0])
    return [depthwise, *([node] if node is not None and node.op_type == "Conv" else [])]


def _is_depthwise(conv: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> bool:
    """A Conv with one group per output channel (and more than one group)."""
    groups = int(attrs(conv).get("group", 1))
    weight = weights.get(conv.input[1])
    return groups > 1 and weight is not None and weight.dims[0] == groups


def int8_head_weights(graph: onnx.GraphProto) -> None:
    """The head's matrix products read int8 weights, their activations stay float (in place).

    Each constant 2-D weight ``W`` [K, F] of a head MatMul (a Gemm becomes MatMul + Add) is stored as
    ``DequantizeLinear(levels, scale)``: int8 levels, one scale per output column (max |W| / 127), no
    activation quantized. ONNX Runtime fuses the pair into its weight-only int8 kernel (MatMulNBits), so a
    VGG16 call reads FC1's 103 MB of levels instead of 411 MB of floats. The gradient is that of
    ``x @ DequantizeLinear(levels, scale)``: the pre-summed channel weights are taken from the dequantized
    weight, and the backward dequantizes its own copy (:meth:`Builder.weight`).
    """
    weights = {i.name: i for i in graph.initializer}
    products = [n for n in head_nodes(graph, contract.ACTIVATIONS, contract.LOGITS) if n.op_type in ("MatMul", "Gemm")]
    for node in products:
        weight = weights.get(node.input[1])
        a = attrs(node)
        if weight is None or len(weight.dims) != 2 or (node.op_type == "Gemm" and a.get("transA", 0)):
            continue
        matrix = numpy_helper.to_array(weight).astype(np.float64)
        if node.op_type == "Gemm":
            matrix = (matrix.T if a.get("transB", 0) else matrix) * a.get("alpha", 1.0)
        scale = np.maximum(np.abs(matrix).max(axis=0), np.finfo(np.float32).tiny) / 127
        name = f"{node.name}/weight"
        graph.initializer.extend([
            numpy_helper.from_array(np.clip(np.round(matrix / scale), -127, 127).astype(np.int8), f"{name}_levels"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
        ])  # fmt: skip
        index = list(graph.node).index(node)
        dequantize = make_node("DequantizeLinear", [f"{name}_levels", f"{name}_scale"], [name],
                               f"{name}/DequantizeLinear", axis=1)  # fmt: skip
        product = [make_node("MatMul", [node.input[0], name], [node.output[0]], f"{node.name}/MatMul")]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            product = _with_bias(graph, node, product[0], a.get("beta", 1.0))
        graph.node.remove(node)
        for offset, new in enumerate([dequantize, *product]):
            graph.node.insert(index + offset, new)
    used = {i for n in graph.node for i in n.input}
    for unused in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(unused)


def _with_bias(graph: onnx.GraphProto, gemm: onnx.NodeProto, product: onnx.NodeProto, beta: float) -> list:
    """``product`` (the Gemm's A @ B) writing a new tensor, then ``+ beta * C`` into the Gemm's output."""
    product.output[0] = f"{gemm.name}/product"
    bias = gemm.input[2]
    if beta != 1.0:
        scaled = f"{gemm.name}/bias"
        graph.initializer.append(numpy_helper.from_array(np.asarray(beta, np.float32), f"{scaled}_beta"))
        return [
            product,
            make_node("Mul", [bias, f"{scaled}_beta"], [scaled], scaled),
            make_node("Add", [product.output[0], scaled], [gemm.output[0]], f"{gemm.name}/add"),
        ]
    return [product, make_node("Add", [product.output[0], bias], [gemm.output[0]], f"{gemm.name}/add")]


def calibration_images(folder: Path) -> list[Path]:
    """The images in ``folder`` (recursive), sorted; fewer than one is an error."""
    if not folder.is_dir():
        raise OnnxcamError(f"--calibrate {folder} is not a folder; give a folder of typical photos (8 or more)")
    paths = sorted(expand([str(folder)]))
    if not paths:
        raise OnnxcamError(f"--calibrate {folder} holds no images; give a folder of typical photos (8 or more)")
    return paths


def quantize_file(source: Path, calibrate: Path, out: Path, fmt: str = "qdq") -> tuple[dict[str, object], list[str]]:
    """Write ``out``, the INT8 explainer of onnxcam model ``source``; return its card and notes for the user."""
    from onnxcam.engine import Engine  # validates the file and reads its card, as any command does

    card: ModelCard = Engine(source).card
    if card.quantized:
        raise OnnxcamError(f"{source} is already INT8 (its graph runs integer kernels); quantize the float model")
    if card.task != "classification" or card.extra_layers:
        what = f"a {card.task} model" if card.task != "classification" else "a model with several target layers"
        raise OnnxcamError(f"{source} is {what}; onnxcam quantize takes a classifier with one target layer (its "
                           "head is regrafted at the layer): explain the float model")  # fmt: skip
    photos = calibration_images(calibrate)
    notes = [] if len(photos) >= 8 else [f"only {len(photos)} calibration images: 8 or more give steadier ranges"]
    model = onnx.load(source)
    forward = forward_graph(model, card.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "forward.onnx", Path(tmp) / "forward.int8.onnx"
        onnx.save(forward, fp32)
        logging.disable(logging.WARNING)  # the tool's advice about its pre-processing script, on the root logger
        try:
            quantize_static(
                fp32, int8, _Photos(photos, card), quant_format=FORMATS[fmt], per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=kept_in_float(forward.graph),
            )  # fmt: skip
        finally:
            logging.disable(logging.NOTSET)
        quantized = onnx.load(int8)
    int8_head_weights(quantized.graph)
    grafted = graft(quantized, contract.ACTIVATIONS, contract.LOGITS)
    description = f"INT8 ({fmt}, per-channel, {len(photos)} calibration images from {calibrate.name}/)"
    summary = f"backbone quantized to {description}; head weights int8, its activations and the gradients float"
    int8_card = dataclasses.replace(
        card,
        weights=f"{card.weights}; {description}",
        weights_path=grafted.weights_path,
        notes="; ".join(filter(None, [card.notes, summary])),
    )
    return save_explainer(grafted.model, int8_card, out).summary(), notes
