"""Graph simplifications before grafting: the forward part alone, with shape-computed pads made constant."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.utils

from onnxcam import contract
from onnxcam_export.probe import probe


def forward_part(model: onnx.ModelProto) -> onnx.ModelProto:
    """image -> (logits, activations): the nodes the forward pass needs, and nothing else."""
    return onnx.utils.Extractor(model).extract_model([contract.IMAGE], [contract.LOGITS, contract.ACTIVATIONS])


def static_pads(model: onnx.ModelProto, size: tuple[int, int]) -> onnx.ModelProto:
    """The model with each Pad whose pads are computed from shapes (TF-style SAME padding) given constant pads.

    Such pads depend on the image size only, which is fixed: one ONNX Runtime run at batch 1 and
    one at batch 2 read them (they must agree). A constant Pad before a Conv is folded into the
    Conv by ONNX Runtime, and quantizes; a computed one keeps a float round trip per block.
    EfficientNet-Lite0's explainer goes from 1178 to 209 nodes. The constant zero Pads are then folded into the
    Convs (:func:`fold_pads`).
    """
    model = forward_part(model)
    constants = {i.name for i in model.graph.initializer}
    computed = [n.input[1] for n in model.graph.node if n.op_type == "Pad" and n.input[1] not in constants]
    if computed:
        values = [probe(model, computed, {contract.IMAGE: np.zeros((n, *size, 3), np.uint8)}) for n in (1, 2)]
        fixed = {name: a for name, a, b in zip(computed, *values, strict=True) if np.array_equal(a, b)}
        model.graph.initializer.extend(
            onnx.numpy_helper.from_array(value, f"{name}/static") for name, value in fixed.items()
        )
        for node in model.graph.node:
            if node.op_type == "Pad" and node.input[1] in fixed:
                node.input[1] = f"{node.input[1]}/static"
        model = forward_part(model)  # without the shape arithmetic that no longer feeds anything
    return fold_pads(model)


def _zero_padding(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[int] | None:
    """The H/W begin and end pads of a constant-mode, zero-valued Pad of an NCHW tensor, else None."""
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
    pads = constants.get(node.input[1]) if len(node.input) > 1 else None
    value = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
    if mode != "constant" or pads is None or value is None or pads.size != 8 or len(node.input) > 3:
        return None
    if np.any(value != 0):
        return None
    pads = [int(p) for p in pads]
    return None if any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0 else [pads[2], pads[3], pads[6], pads[7]]


def fold_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """Zero Pads that only feed Convs merged into the Convs' own pads (what ONNX Runtime does for float at load
    time; done in the file, the INT8 convolutions get the pads too instead of a separate uint8 Pad each)."""
    graph = model.graph
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        spatial, convs = _zero_padding(pad, constants), readers.get(pad.output[0], [])
        if spatial is None or pad.output[0] in outputs or not convs:
            continue
        if any(c.op_type != "Conv" or list(c.input).index(pad.output[0]) != 0 for c in convs):
            continue
        attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in c.attribute} for c in convs]
        if any(a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"") for a in attributes):
            continue
        for conv, a in zip(convs, attributes, strict=True):
            own = list(a.get("pads", [0, 0, 0, 0]))
            conv.input[0] = pad.input[0]
            kept = [x for x in conv.attribute if x.name != "pads"]
            del conv.attribute[:]
            conv.attribute.extend(
                [*kept, onnx.helper.make_attribute("pads", [x + y for x, y in zip(own, spatial, strict=True)])]
            )
        graph.node.remove(pad)
        if not any(pad.input[1] in n.input for n in graph.node):
            graph.initializer.remove(next(t for t in graph.initializer if t.name == pad.input[1]))
    return model
