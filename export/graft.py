"""Graft Grad-CAM gradients into a forward ONNX graph (needs ``onnx`` only, never torch).

Given a classifier graph, the name of the target-layer tensor ``A`` and of the logits, the
reverse-mode walker :func:`backward` applies one rule from :mod:`onnxcam_export.vjp` per node
of the head (the nodes on a path from ``A`` to the logits), newest first, summing gradients
that reach a tensor along several paths. The result obeys :mod:`onnxcam.contract`.

The per-channel weights ``alpha = mean_hw(dy/dA)`` take a cheap exact path when the head
starts with channel-wise, mass-preserving ops (MaxPool, average pools, Identity, Dropout)
followed by Flatten and a constant Gemm/MatMul: those ops only move gradient within a
channel, so ``sum_hw(dA) = dZ @ W_sum`` with ``W_sum`` the FC weight pre-summed over the
spatial positions (VGG16: 512x4096 instead of 25088x4096). The rest of the walk, from the
first FC node down to ``A`` (the full gradient tensor), then runs inside an ``If`` on
``full_gradients``, so the FC weight is read a second time only when a caller asks for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnx.utils
from onnx import TensorProto, helper, numpy_helper

from onnxcam import contract
from onnxcam_export import saliency
from onnxcam_export.builder import Builder, Types, infer_types
from onnxcam_export.vjp import RULES, Grad, Rule, UnsupportedOp, attrs

# Ops whose backward only moves gradient within a channel and preserves its sum.
MASS_PRESERVING = {"MaxPool", "GlobalAveragePool", "AveragePool", "Identity", "Dropout"}
HEAD_RUN_LOGITS = f"{contract.HEAD_LOGITS}/run"  # the logits of the head-only copy, inside its If

Grads = dict[str, list[str]]  # forward tensor -> the gradients that reached it, summed when first read
Presummed = tuple[onnx.NodeProto, np.ndarray]  # the first FC node, its weight summed over positions [F, C]
Branch = tuple[str, list[onnx.NodeProto], str]  # an If branch: graph name, nodes, its one output


# -- the reverse-mode walk: it knows the rules table, no op ---------------------------------------
def rule_for(node: onnx.NodeProto) -> Rule:
    """The gradient rule for ``node``; UnsupportedOp naming the op, the node and the supported ops."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in RULES:
        supported = ", ".join(sorted(RULES))
        raise UnsupportedOp(
            f"no gradient rule for op {node.op_type!r} (node {node.name or node.output[0]!r}) between the "
            f"target layer and the logits; supported ops: {supported}. Pick a later layer with --layer."
        )
    return RULES[node.op_type]


def input_gradients(b: Builder, node: onnx.NodeProto, dys: list[Grad]) -> list[Grad]:
    """One gradient per input of ``node`` from its rule, given one per output (None: no gradient).

    A rule may stop after its last differentiable input; the trailing inputs get None.
    """
    dxs = list(rule_for(node).vjp(b, node, dys))
    if len(dxs) > len(node.input):
        raise RuntimeError(
            f"the {node.op_type} rule returned {len(dxs)} gradients {dxs} for node "
            f"{node.name or node.output[0]!r}, which has {len(node.input)} inputs"
        )
    return dxs + [None] * (len(node.input) - len(dxs))


def gradient_of(b: Builder, grads: Grads, name: str) -> Grad:
    """The gradient of tensor ``name``: the sum of those that reached it, one Sum emitted at the first read."""
    parts = grads.get(name)
    if not parts:
        return None
    if len(parts) > 1:
        grads[name] = parts = [b.op("Sum", *parts)]
    return parts[0]


def backward(b: Builder, nodes: Sequence[onnx.NodeProto], grads: Grads) -> Grads:
    """Reverse mode over ``nodes`` (in graph order), newest first, starting from ``grads``.

    A node whose outputs have a gradient passes it to its inputs through its rule; only the
    inputs the builder ``needs`` keep theirs. Returns the gradients after the walk (a new map).
    """
    grads = {name: list(parts) for name, parts in grads.items()}
    for node in reversed(nodes):
        dys = [gradient_of(b, grads, name) for name in node.output]
        if all(dy is None for dy in dys):
            continue
        for name, dx in zip(node.input, input_gradients(b, node, dys), strict=True):
            if dx is not None and b.needs(name):
                grads.setdefault(name, []).append(dx)
    return grads


def _reached(b: Builder, grads: Grads, name: str) -> str:
    """The gradient of ``name``, which the walk must have reached."""
    dx = gradient_of(b, grads, name)
    if dx is None:
        raise UnsupportedOp(f"no gradient reaches {name!r} from {contract.LOGITS!r}")
    return dx


# -- the head: the nodes between the target layer and the logits ----------------------------------
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


def static_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from initializers and constants alone (weights, shapes)."""
    known = {i.name for i in graph.initializer} | {""}
    for node in graph.node:
        if all(i in known for i in node.input):
            known.update(node.output)
    return known


def _check_rules(head: Iterable[onnx.NodeProto]) -> None:
    """Fail before anything is built when a head node has no rule."""
    for node in head:
        rule_for(node)


def _expose_extra_outputs(head: Iterable[onnx.NodeProto]) -> None:
    """Give each node the optional outputs its rule reads (MaxPool: Indices), named after its first output."""
    for node in head:
        for index, label in enumerate(rule_for(node).extra_outputs, start=1):
            node.output.extend([""] * (index + 1 - len(node.output)))
            if not node.output[index]:
                node.output[index] = f"{node.output[0]}/{label}"


def _head_copy(graph: onnx.GraphProto, head: list[onnx.NodeProto]) -> list[onnx.NodeProto] | None:
    """The head's nodes again, reading ``head_activations`` and writing ``head_logits/run`` (weights shared).

    The copies leave out the outputs only a gradient rule reads. None when the head also reads
    tensors computed before the target layer (not a cut).
    """
    renamed = {contract.ACTIVATIONS: contract.HEAD_ACTIVATIONS}
    renamed |= {o: f"head/{o}" for n in head for o in n.output if o}
    renamed[contract.LOGITS] = HEAD_RUN_LOGITS
    static = static_tensors(graph)
    copies = []
    for node in head:
        if any(i not in renamed and i not in static for i in node.input):
            return None
        extra = range(1, 1 + len(rule_for(node).extra_outputs))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"head/{node.name or node.output[0]}"
        copy.input[:] = [renamed.get(i, i) for i in node.input]
        copy.output[:] = [renamed[o] if o else "" for i, o in enumerate(node.output) if i not in extra]
        copies.append(copy)
    return copies


def annotate_shapes(
    model: onnx.ModelProto, feed: dict[str, np.ndarray], batch: onnx.TensorShapeProto.Dimension
) -> Types:
    """Fill the shapes ONNX inference cannot derive (e.g. pads computed from Shape ops) by one ORT run.

    Every such tensor's shape at the fed input size is recorded in ``value_info``, with the
    batch axis set to ``batch``, so the rules see static channel and spatial sizes. Returns
    the types of the model as it leaves (:func:`infer_types`, run again only if the model changed).
    Raises RuntimeError when ONNX Runtime cannot run the model.
    """
    types = infer_types(model)
    known = {
        n for n, t in types.items() if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim[1:])
    }
    static = static_tensors(model.graph)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    missing = [o for n in model.graph.node for o in n.output if o in used and o not in known and o not in static]
    if not missing:
        return types
    import onnxruntime as ort  # a runtime dependency of onnxcam anyway

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in missing)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        values = session.run(missing, feed)
    except Exception as exc:  # ORT's own exception types
        raise RuntimeError(str(exc)) from exc
    recorded = [(n, v) for n, v in zip(missing, values, strict=True) if isinstance(v, np.ndarray) and v.ndim]
    if not recorded:
        return types
    by_name = {v.name: v for v in model.graph.value_info}
    for name, value in recorded:
        info = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
        info.type.tensor_type.shape.dim[0].CopyFrom(batch)
        if name in by_name:
            model.graph.value_info.remove(by_name[name])
        model.graph.value_info.append(info)
    return infer_types(model)


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


def _resolve_targets(b: Builder, logits: str) -> str:
    """target_classes = targets where targets >= 0, else the (-targets)-th ranked class."""
    classes = b.dims(logits, 1, 2)
    ranked = b.op_multi("TopK", logits, classes, outputs=2, axis=1, largest=1, sorted=1)[1]
    zero, one = b.const(np.asarray(0, dtype=np.int64)), b.const(np.asarray(1, dtype=np.int64))
    negative = b.op("Less", contract.TARGETS, zero)
    rank = b.op("Where", negative, b.op("Sub", b.op("Neg", contract.TARGETS), one), zero)  # -k -> k-1
    last = b.op("Sub", classes, one)
    rank = b.op("Where", b.op("Less", rank, classes), rank, last)  # (Where, not Min: int64 Min needs opset 12)
    picked = b.op("GatherElements", ranked, rank, axis=1)
    b.nodes.append(
        helper.make_node("Where", [negative, picked, contract.TARGETS], [contract.TARGET_CLASSES], name="targets")
    )
    return contract.TARGET_CLASSES


# -- the graph's new parts, each emitted by one function -------------------------------------------
def _seed(b: Builder, logits: str) -> str:
    """The gradient of the explained scores w.r.t. the logits: OneHot(target_classes), [N, T, K]."""
    target_classes = _resolve_targets(b, logits)
    classes = b.op("Reshape", b.dims(logits, 1, 2), b.ints([]))
    return b.op("OneHot", target_classes, classes, b.const(np.asarray([0, 1], dtype=b.np_dtype(logits))), axis=-1)


def _walk(
    b: Builder, head: list[onnx.NodeProto], seed: str, cheap: Presummed | None, spatial: list[int]
) -> tuple[str, Branch]:
    """sum_hw(dy/dA) [N, T, C], and the If branch that builds the full gradient dy/dA."""
    seeds = {contract.LOGITS: [seed]}
    if cheap is None:  # the sum of the full gradient, computed outside the If
        gradients = _reached(b, backward(b, head, seeds), contract.ACTIVATIONS)
        full = helper.make_node("Identity", [gradients], [gradients + "/full"])
        return b.reduce("ReduceSum", gradients, spatial, keepdims=0), ("full", [full], full.output[0])
    fc, weight = cheap
    cut = head.index(fc) + 1  # sum_hw(dA) = dZ @ W_sum; the walk through the FC and below moves into the If
    grads = backward(b, head[cut:], seeds)
    summed = b.op("MatMul", _reached(b, grads, fc.output[0]), b.const(weight, "fc_weight_presummed"))
    with b.subgraph() as nodes:
        gradients = _reached(b, backward(b, head[:cut], grads), contract.ACTIVATIONS)
    return summed, ("full", nodes, gradients)


def _if(name: str, condition: str, output: str, elem: int, then: Branch, otherwise: Branch) -> onnx.NodeProto:
    """An ``If`` node whose branches each compute one tensor of element type ``elem``."""
    graphs = {
        key: helper.make_graph(nodes, graph_name, [], [helper.make_tensor_value_info(result, elem, None)])
        for key, (graph_name, nodes, result) in (("then_branch", then), ("else_branch", otherwise))
    }
    return helper.make_node("If", [condition], [output], name=name, **graphs)


def _emit_weights(b: Builder, summed: str) -> None:
    """weights = sum_hw(dy/dA) / (h * w), [N, T, C]."""
    plane = b.op("Cast", b.product(contract.ACTIVATIONS, 2), to=b.elem_type(contract.LOGITS))
    b.nodes.append(helper.make_node("Div", [summed, plane], [contract.WEIGHTS], name="weights"))


def _emit_gradients(b: Builder, full: Branch, spatial: list[int], condition: str = contract.FULL_GRADIENTS) -> None:
    """gradients = the output of branch ``full`` when ``condition`` (``full_gradients``), else [N, T, C, 0, 0] zeros."""
    with b.subgraph() as nodes:
        shape = b.op("Concat", b.op("Shape", contract.WEIGHTS), b.ints([0] * len(spatial)), axis=0)
        empty = ("empty", nodes, b.zeros(shape, like=contract.LOGITS))
    elem = b.elem_type(contract.LOGITS)
    b.nodes.append(_if("gradients", condition, contract.GRADIENTS, elem, full, empty))


def _add_head_only(graph: onnx.GraphProto, b: Builder, copies: list[onnx.NodeProto]) -> None:
    """head_logits = the head run on head_activations, behind an If on run_head (false by default), so
    that ordinary calls never run it, whatever its reshapes need."""
    elem, classes = b.elem_type(contract.LOGITS), b.shape(contract.LOGITS)[1]
    skipped = helper.make_node("Identity", ["head/none"], ["head/skipped"])
    head = ("head", copies, HEAD_RUN_LOGITS)
    no_head = ("no_head", [skipped], "head/skipped")
    graph.node.append(_if("head", contract.RUN_HEAD, contract.HEAD_LOGITS, elem, head, no_head))
    empty = np.zeros([0, *b.shape(contract.ACTIVATIONS)[1:]], dtype=b.np_dtype(contract.ACTIVATIONS))
    graph.input.append(helper.make_tensor_value_info(contract.HEAD_ACTIVATIONS, elem, ["M", *empty.shape[1:]]))
    graph.initializer.append(numpy_helper.from_array(empty, contract.HEAD_ACTIVATIONS))
    graph.input.append(helper.make_tensor_value_info(contract.RUN_HEAD, TensorProto.BOOL, []))
    no_logits = numpy_helper.from_array(np.zeros([0, classes], dtype=b.np_dtype(contract.LOGITS)), "head/none")
    graph.initializer.extend([numpy_helper.from_array(np.asarray(False), contract.RUN_HEAD), no_logits])


def _add_contract_io(graph: onnx.GraphProto, b: Builder, spatial: list[int], head_only: bool) -> None:
    """The contract's inputs targets and full_gradients, and its outputs in contract order."""
    elem, info = b.elem_type(contract.LOGITS), helper.make_tensor_value_info
    batch = b.shape(contract.LOGITS)[0] or "N"
    channels, classes = b.shape(contract.ACTIVATIONS)[1], b.shape(contract.LOGITS)[1]
    graph.input.append(info(contract.TARGETS, TensorProto.INT64, [batch, "T"]))
    graph.input.append(info(contract.FULL_GRADIENTS, TensorProto.BOOL, []))
    graph.initializer.append(numpy_helper.from_array(np.asarray(False), contract.FULL_GRADIENTS))
    del graph.output[:]
    graph.output.extend(
        [
            info(contract.LOGITS, elem, [batch, classes]),
            info(contract.ACTIVATIONS, elem, [batch, channels, *b.shape(contract.ACTIVATIONS)[2:]]),
            info(contract.WEIGHTS, elem, [batch, "T", channels]),
            info(contract.GRADIENTS, elem, [batch, "T", channels, *[f"h{i}" for i in range(len(spatial))]]),
            info(contract.TARGET_CLASSES, TensorProto.INT64, [batch, "T"]),
        ]
    )
    if head_only:
        graph.output.append(info(contract.HEAD_LOGITS, elem, ["M", classes]))


def graft(
    model: onnx.ModelProto, activations: str, logits: str, types: Types | None = None
) -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` obeying the onnxcam contract, and how its weights are computed.

    ``types``: :func:`infer_types` of ``model`` where the caller has it (else inferred after the rule checks).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for tensor, name in ((activations, contract.ACTIVATIONS), (logits, contract.LOGITS)):
        renamed = rename_tensor(graph, tensor, name)
        types = None if types is None else {renamed.get(t, t): value for t, value in types.items()}
    head = head_nodes(graph, contract.ACTIVATIONS, contract.LOGITS)
    _check_rules(head)
    head_only = _head_copy(graph, head)
    _expose_extra_outputs(head)
    b = Builder(out, types)
    b.wanted = {contract.ACTIVATIONS} | {o for n in head for o in n.output}
    spatial = list(range(3, b.rank(contract.ACTIVATIONS) + 1))  # the h, w axes of [N, T, C, h, w]
    seed = _seed(b, contract.LOGITS)
    cheap = presummed_weight(b, head, contract.ACTIVATIONS)
    summed, full = _walk(b, head, seed, cheap, spatial)
    _emit_weights(b, summed)
    _emit_gradients(b, full, spatial, saliency.gradients_condition(b))
    saliency.add_saliency(graph, b, _input_size(b))
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.initializers)
    if head_only is not None:
        _add_head_only(graph, b, head_only)
    _add_contract_io(graph, b, spatial, head_only is not None)
    _add_saliency_output(graph, b)
    return out, "presummed" if cheap is not None else "gradient-mean"


def _input_size(b: Builder) -> tuple[int, int]:
    """(H, W) of the ``image`` input [N, H, W, 3], which the saliency map takes."""
    shape = b.shape(contract.IMAGE)
    if not shape or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:3]):
        raise UnsupportedOp(f"the {contract.IMAGE!r} input needs a static [N, H, W, 3] shape, got {shape}")
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
