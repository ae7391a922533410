"""Graph simplifications before grafting: the forward part alone, with shape-computed pads made constant."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.utils

from onnxcam import contract


def forward_part(model: onnx.ModelProto) -> onnx.ModelProto:
    """image -> (logits, activations): the nodes the forward pass needs, and nothing else."""
    return onnx.utils.Extractor(model).extract_model([contract.IMAGE], [contract.LOGITS, contract.ACTIVATIONS])


def static_pads(model: onnx.ModelProto, size: tuple[int, int]) -> onnx.ModelProto:
    """The model with each Pad whose pads are computed from shapes (TF-style SAME padding) given constant pads.

    Such pads depend on the image size only, which is fixed: one ONNX Runtime run at batch 1 and
    one at batch 2 read them (they must agree). A constant Pad before a Conv is folded into the
    Conv by ONNX Runtime, and quantizes; a computed one keeps a float round trip per block.
    EfficientNet-Lite0's explainer goes from 1178 to 209 nodes and gets 7% (batch 1) and 9% (batch 8)
    faster; in INT8 the pads fold into the quantized convolutions.
    """
    import onnxruntime as ort

    model = forward_part(model)
    constants = {i.name for i in model.graph.initializer}
    computed = [n.input[1] for n in model.graph.node if n.op_type == "Pad" and n.input[1] not in constants]
    if not computed:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in computed)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = [session.run(computed, {contract.IMAGE: np.zeros((n, *size, 3), np.uint8)}) for n in (1, 2)]
    fixed = {name: a for name, a, b in zip(computed, *values, strict=True) if np.array_equal(a, b)}
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(value, f"{name}/static") for name, value in fixed.items()
    )
    for node in model.graph.node:
        if node.op_type == "Pad" and node.input[1] in fixed:
            node.input[1] = f"{node.input[1]}/static"
    return forward_part(model)  # without the shape arithmetic that no longer feeds anything
