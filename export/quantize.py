"""``onnxcam quantize``: an INT8 explainer from a float one (a build step: needs ``onnx`` and ONNX Runtime's tools).

The forward part (image -> logits, activations) is cut out of the explainer, statically
quantized by ONNX Runtime's own tool (``onnxruntime.quantization.quantize_static``: uint8
activations, int8 weights per output channel, MinMax calibration on the given photos), with
the head (target layer -> logits) kept in float, and grafted again: the class gradient, the
cheap channel weights and the saliency map are computed in float from the INT8 backbone's
activations. The first Conv and the one that makes the target layer stay float too
(:func:`kept_in_float`). Pads computed from shapes (TF-style SAME padding) are made
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
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from onnxcam import contract
from onnxcam.contract import ModelCard
from onnxcam.errors import OnnxcamError
from onnxcam.image import read_rgb, resize_rgb
from onnxcam.inputs import expand
from onnxcam_export.graft import graft, head_nodes
from onnxcam_export.save import save_explainer
from onnxcam_export.simplify import static_pads

# QDQ (default): QuantizeLinear/DequantizeLinear pairs around float ops, default-domain ONNX that any runtime
# reads, which ONNX Runtime fuses into int8 kernels; QOperator: ONNX Runtime's QLinear* ops, some of them in
# its com.microsoft domain. Both ran at the same speed here (benchmarks/int8.py).
FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}


class _Photos(CalibrationDataReader):
    """The calibration photos, one at a time, as the ``image`` input (uint8 RGB at the model's size)."""

    def __init__(self, paths: list[Path], size: tuple[int, int]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = ({contract.IMAGE: resize_rgb(read_rgb(p), size)[None]}
                                                        for p in paths)  # fmt: skip

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


ELEMENTWISE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "BatchNormalization", "Identity"}


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
    groups = next((a.i for a in conv.attribute if a.name == "group"), 1)
    weight = weights.get(conv.input[1])
    return groups > 1 and weight is not None and weight.dims[0] == groups


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
                fp32, int8, _Photos(photos, card.input_size), quant_format=FORMATS[fmt], per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=kept_in_float(forward.graph),
            )  # fmt: skip
        finally:
            logging.disable(logging.NOTSET)
        quantized = onnx.load(int8)
    grafted, weights_path = graft(quantized, contract.ACTIVATIONS, contract.LOGITS)
    description = f"INT8 ({fmt}, per-channel, {len(photos)} calibration images from {calibrate.name}/)"
    int8_card = dataclasses.replace(
        card,
        weights=f"{card.weights}; {description}",
        weights_path=weights_path,
        notes="; ".join(filter(None, [card.notes, f"backbone quantized to {description}; head and gradients float"])),
    )
    return save_explainer(grafted, int8_card, out).summary(), notes
