"""Graph simplifications before grafting: the forward part alone, with shape-computed pads made constant."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.utils

from onnxcam import contract
from onnxcam_export.builder import Builder, Types
from onnxcam_export.probe import probe
from onnxcam_export.walk import inputs_of


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


UNARY_PER_ELEMENT = {"Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "Softplus", "Exp", "Neg", "Sqrt", "Identity", "Elu",
                     "LeakyRelu", "HardSigmoid", "HardSwish", "Mish", "Abs", "Cast"}  # fmt: skip
BINARY_PER_ELEMENT = {"Add", "Sub", "Mul", "Div", "Pow"}


def pick_tokens_early(model: onnx.ModelProto, types: Types, keep: set[str]) -> bool:
    """Move each pick of one token (``Gather`` of a constant scalar index along a token axis: a ViT's class token)
    up through the per-token ops before it (element-wise ops, a LayerNormalization over channels, a MatMul by a
    matrix), which then run on that token alone; ``keep`` (the target layers) are picked, never crossed. Whether a
    rewrite happened (the ``types`` are then stale).

    The result is the same: those ops compute each token from that token alone. A ViT's last block after its
    attention (its MLP, two thirds of the block) then runs on the class token, in the forward and in each target's
    backward, whose gradient was zero at every other token there (benchmarks/clip_cost.py: CLIP ViT-B/32, 8 prompts).
    """
    graph, b = model.graph, Builder(model, types)
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    stops = keep | {i.name for i in graph.input} | {o.name for o in graph.output}

    def crossable(name: str, axis: int) -> list | None:
        node = producer.get(name)
        return None if node is None or name in stops or b.shape(name) is None else _per_token_inputs(b, node, axis)

    crossed: set[str] = set()
    crossed_by: list[onnx.NodeProto] = []  # the picks moved so far
    for pick in [n for n in nodes if n.op_type == "Gather"]:
        data, index, shape = pick.input[0], pick.input[1], b.shape(pick.input[0])
        value = b.constant_value(index)
        if value is None or value.ndim or value.dtype.kind != "i" or shape is None or len(shape) < 3:
            continue
        axis = next((a.i for a in pick.attribute if a.name == "axis"), 0) % len(shape)
        if crossable(data, axis) is None:
            continue
        added: list[onnx.NodeProto] = []
        memo: dict[str, str] = {}  # (per pick: a DeiT picks its class and its distillation token)

        def picked(name: str, axis: int = axis, index: str = index, added: list = added, memo: dict = memo) -> str:
            """A tensor equal to ``name`` picked at the token (``name`` has the token axis)."""
            if name not in memo:
                inputs, out = crossable(name, axis), f"{name}/picked{len(crossed_by)}"
                if inputs is None:
                    added.append(onnx.helper.make_node("Gather", [name, index], [out], axis=axis))
                else:
                    node = producer[name]
                    crossed.add(name)
                    new = [picked(x) if cross else x for x, cross in inputs]
                    added.append(onnx.helper.make_node(node.op_type, new, [out], domain=node.domain))
                    added[-1].attribute.extend(_counted_from_the_end(node, b.rank(name)))
                memo[name] = out
            return memo[name]

        result = picked(data)
        crossed_by.append(pick)
        at = nodes.index(pick)
        nodes[at:at] = added
        del pick.input[:], pick.attribute[:]
        pick.op_type = "Identity"  # (keeps its output's name)
        pick.input.append(result)
    if crossed_by:
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unread(graph, crossed)
    return bool(crossed_by)


def _per_token_inputs(b: Builder, node: onnx.NodeProto, axis: int) -> list | None:
    """``node``'s inputs, each with whether it carries the token axis (to be picked), where ``node`` computes each
    token of its output from that token alone; else None."""
    if len(node.output) != 1 and node.op_type != "LayerNormalization":
        return None
    out, rank = node.output[0], b.rank(node.output[0])

    def alike(x: str, axes: int = rank) -> bool:  # provably the size of the output along its first ``axes`` axes
        shape = b.shape(x)
        return shape is not None and len(shape) == rank and all(b.same_dim(x, out, i) for i in range(axes))

    if node.op_type in UNARY_PER_ELEMENT:
        return [(node.input[0], True)] if alike(node.input[0]) else None
    if node.op_type == "LayerNormalization":
        norm = next((a.i for a in node.attribute if a.name == "axis"), -1) % rank
        alone = all(not o for o in node.output[1:])
        return [(node.input[0], True), *((x, False) for x in node.input[1:])] if norm > axis and alone else None
    if node.op_type == "MatMul":
        matrix = b.shape(node.input[1])
        by_matrix = matrix is not None and len(matrix) == 2 and axis < rank - 1
        return [(node.input[0], True), (node.input[1], False)] if by_matrix and alike(node.input[0], rank - 1) else None
    if node.op_type in BINARY_PER_ELEMENT:
        found = []
        for x in node.input:
            shape = b.shape(x)
            if shape is not None and len(shape) < rank - axis:  # broadcast along the tokens (a bias)
                found.append((x, False))
            elif alike(x):
                found.append((x, True))
            else:
                return None
        return found
    return None


def _counted_from_the_end(node: onnx.NodeProto, rank: int) -> list[onnx.AttributeProto]:
    """``node``'s attributes with a LayerNormalization's ``axis`` counted from the end: the picked input has one
    axis fewer, before it."""
    return [onnx.helper.make_attribute("axis", a.i % rank - rank) if node.op_type == "LayerNormalization" and
            a.name == "axis" else a for a in node.attribute]  # fmt: skip


def _drop_unread(graph: onnx.GraphProto, tensors: set[str]) -> None:
    """The nodes making one of ``tensors`` that no other node, branch or graph output reads any more."""
    while True:
        read = {o.name for o in graph.output}
        for node in graph.node:
            read.update(inputs_of(node))
        unread = [n for n in graph.node if len(n.output) == 1 and n.output[0] in tensors and n.output[0] not in read]
        if not unread:
            return
        for node in unread:
            graph.node.remove(node)

