"""Graft Grad-CAM gradients into a forward ONNX graph (needs ``onnx`` only, never torch).

Given a classifier graph, the name of the target-layer tensor ``A`` and of the logits, the
reverse-mode walker below applies one rule from :mod:`onnxcam_export.vjp` per node of the
head (the nodes on a path from ``A`` to the logits), newest first, summing gradients that
reach a tensor along several paths. The result obeys :mod:`onnxcam.contract`.

The per-channel weights ``alpha = mean_hw(dy/dA)`` take a cheap exact path when the head
starts with channel-wise, mass-preserving ops (MaxPool, average pools, Identity, Dropout)
followed by Flatten and a constant Gemm/MatMul: those ops only move gradient within a
channel, so ``sum_hw(dA) = dZ @ W_sum`` with ``W_sum`` the FC weight pre-summed over the
spatial positions (VGG16: 512x4096 instead of 25088x4096). The full gradient tensor is then
built inside an ``If`` on ``full_gradients``, so the FC weight is read a second time only
when a caller asks for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcam import contract
from onnxcam_export.builder import Builder
from onnxcam_export.vjp import RULES, UnsupportedOp, attrs

# Ops whose backward only moves gradient within a channel and preserves its sum.
MASS_PRESERVING = {"MaxPool", "GlobalAveragePool", "AveragePool", "Identity", "Dropout"}


def head_nodes(graph: onnx.GraphProto, activations: str, logits: str) -> list[onnx.NodeProto]:
    """The nodes on some path from ``activations`` to ``logits``, in graph (topological) order."""
    reached = {activations}
    downstream = []
    for node in graph.node:
        if reached.intersection(node.input):
            downstream.append(node)
            reached.update(o for o in node.output if o)
    if logits not in reached:
        raise UnsupportedOp(f"tensor {logits!r} does not depend on the target layer {activations!r}")
    needed = {logits}
    head = []
    for node in reversed(downstream):
        if needed.intersection(node.output):
            head.append(node)
            needed.update(node.input)
    return head[::-1]


def _check_rules(head: Iterable[onnx.NodeProto]) -> None:
    for node in head:
        if node.domain not in ("", "ai.onnx") or node.op_type not in RULES:
            supported = ", ".join(sorted(RULES))
            raise UnsupportedOp(
                f"no gradient rule for op {node.op_type!r} (node {node.name or node.output[0]!r}) between the "
                f"target layer and the logits; supported ops: {supported}. Pick a later layer with --layer."
            )


def _consumers(head: list[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in head:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _preserves_mass(node: onnx.NodeProto) -> bool:
    a = attrs(node)
    if node.op_type == "AveragePool":
        padded = any(a.get("pads", [])) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")
        return not int(a.get("ceil_mode", 0)) and (not padded or not int(a.get("count_include_pad", 0)))
    return node.op_type in MASS_PRESERVING


def presummed_weight(
    b: Builder, head: list[onnx.NodeProto], activations: str
) -> tuple[onnx.NodeProto, np.ndarray] | None:
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
    weight = b.constant_value(fc.input[1]) if fc.input[0] == flatten.output[0] else None
    if weight is None or weight.ndim != 2 or fc.op_type not in ("Gemm", "MatMul"):
        return None
    a = attrs(fc)
    if fc.op_type == "Gemm":
        if int(a.get("transA", 0)):
            return None
        weight = (weight.T if int(a.get("transB", 0)) else weight) * float(a.get("alpha", 1.0))
    # weight: [C*P, F] in Flatten's channel-major order -> sum over P -> [F, C]
    summed = weight.astype(np.float64).reshape(channels, positions, -1).sum(axis=1).T
    return fc, summed.astype(weight.dtype)


def _sum(b: Builder, grads: list[str] | None) -> str | None:
    if not grads:
        return None
    return grads[0] if len(grads) == 1 else b.op("Sum", *grads)


def _resolve_targets(b: Builder, logits: str) -> str:
    """target_classes = targets where targets >= 0, else the (-targets)-th ranked class."""
    classes = b.dims(logits, 1, 2)
    ranked = b.op_multi("TopK", logits, classes, outputs=2, axis=1, largest=1, sorted=1)[1]
    zero = b.const(np.asarray(0, dtype=np.int64))
    rank = b.op("Sub", b.op("Neg", contract.TARGETS), b.const(np.asarray(1, dtype=np.int64)))
    rank = b.op("Min", b.op("Max", rank, zero), b.op("Sub", classes, b.const(np.asarray([1], dtype=np.int64))))
    picked = b.op("GatherElements", ranked, rank, axis=1)
    negative = b.op("Less", contract.TARGETS, zero)
    b.nodes.append(
        helper.make_node("Where", [negative, picked, contract.TARGETS], [contract.TARGET_CLASSES], name="targets")
    )
    return contract.TARGET_CLASSES


def graft(model: onnx.ModelProto, activations: str, logits: str) -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` obeying the onnxcam contract, and how its weights are computed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    head = head_nodes(graph, activations, logits)
    _check_rules(head)
    for node in head:
        if node.op_type == "MaxPool" and (len(node.output) < 2 or not node.output[1]):
            del node.output[1:]
            node.output.append(f"{node.output[0]}/indices")
    b = Builder(out)
    elem = b.elem_type(logits)
    b.wanted = {activations} | {o for n in head for o in n.output}
    target_classes = _resolve_targets(b, logits)
    classes = b.op("Reshape", b.dims(logits, 1, 2), b.ints([]))
    seed = b.op("OneHot", target_classes, classes, b.const(np.asarray([0, 1], dtype=b.np_dtype(logits))), axis=-1)

    cheap = presummed_weight(b, head, activations)
    grads: dict[str, list[str]] = {logits: [seed]}
    main_nodes, branch_nodes = b.nodes, []
    weights_raw = None
    for node in reversed(head):
        dys = [_sum(b, grads.get(o)) for o in node.output]
        if all(dy is None for dy in dys):
            continue
        if cheap is not None and node is cheap[0]:
            # sum_hw(dA) = dZ @ W_sum: everything below the first FC moves to the If branch
            weights_raw = b.op("MatMul", dys[0], b.const(cheap[1], "fc_weight_presummed"))
            b.nodes = branch_nodes
        for name, dx in zip(node.input, RULES[node.op_type](b, node, dys), strict=False):
            if dx is not None and b.needs(name):
                grads.setdefault(name, []).append(dx)
    gradients = _sum(b, grads.get(activations))
    if gradients is None:
        raise UnsupportedOp(f"no gradient reaches {activations!r} from {logits!r}")
    b.nodes = main_nodes
    spatial = list(range(3, b.rank(activations) + 1))
    if weights_raw is None:  # no cheap path: the mean of the full gradient, computed outside the If
        weights_raw = b.reduce("ReduceSum", gradients, spatial, keepdims=0)
        branch_nodes.append(helper.make_node("Identity", [gradients], [gradients + "/full"]))
        gradients += "/full"
    plane = b.op("Cast", b.op("ReduceProd", b.dims(activations, 2), keepdims=1), to=elem)
    b.nodes.append(helper.make_node("Div", [weights_raw, plane], [contract.WEIGHTS], name="weights"))

    b.nodes = else_nodes = []
    empty_shape = b.op("Concat", b.op("Shape", contract.WEIGHTS), b.ints([0] * len(spatial)), axis=0)
    empty = b.op("ConstantOfShape", empty_shape, value=helper.make_tensor("zero", elem, [1], [0]))
    b.nodes = main_nodes
    branch = {
        "then_branch": helper.make_graph(
            branch_nodes, "full", [], [helper.make_tensor_value_info(gradients, elem, None)]
        ),
        "else_branch": helper.make_graph(else_nodes, "empty", [], [helper.make_tensor_value_info(empty, elem, None)]),
    }
    b.nodes.append(helper.make_node("If", [contract.FULL_GRADIENTS], [contract.GRADIENTS], name="gradients", **branch))

    _rename_output(b, logits, contract.LOGITS)
    _rename_output(b, activations, contract.ACTIVATIONS)
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.initializers)
    graph.input.append(helper.make_tensor_value_info(contract.TARGETS, TensorProto.INT64, ["N", "T"]))
    graph.input.append(helper.make_tensor_value_info(contract.FULL_GRADIENTS, TensorProto.BOOL, []))
    graph.initializer.append(numpy_helper.from_array(np.asarray(False), contract.FULL_GRADIENTS))
    channels = b.shape(activations)[1]
    spatial_dims = [f"h{i}" for i in range(len(spatial))]
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(contract.LOGITS, elem, ["N", b.shape(logits)[1]]),
            helper.make_tensor_value_info(contract.ACTIVATIONS, elem, ["N", channels, *b.shape(activations)[2:]]),
            helper.make_tensor_value_info(contract.WEIGHTS, elem, ["N", "T", channels]),
            helper.make_tensor_value_info(contract.GRADIENTS, elem, ["N", "T", channels, *spatial_dims]),
            helper.make_tensor_value_info(contract.TARGET_CLASSES, TensorProto.INT64, ["N", "T"]),
        ]
    )
    return out, "presummed" if cheap is not None else "gradient-mean"


def _rename_output(b: Builder, tensor: str, name: str) -> None:
    if tensor != name:
        b.nodes.append(helper.make_node("Identity", [tensor], [name], name=name))


def set_card(model: onnx.ModelProto, card: dict[str, object]) -> None:
    """Store the model card as ``onnxcam.*`` metadata (non-strings as JSON)."""
    unknown = set(card) - set(contract.META_KEYS)
    if unknown:
        raise ValueError(f"unknown model card keys {sorted(unknown)}; known: {contract.META_KEYS}")
    del model.metadata_props[:]
    for key, value in card.items():
        text = value if isinstance(value, str) else json.dumps(value)
        model.metadata_props.append(onnx.StringStringEntryProto(key=contract.META_PREFIX + key, value=text))
