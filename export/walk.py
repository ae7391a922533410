"""The reverse-mode walk over an ONNX graph: op-agnostic, it knows the rules table (:mod:`onnxcam_export.vjp`)
and no op (needs ``onnx`` only).

:func:`head_nodes` finds the nodes on a path from the target layer to the logits, :func:`differentiable` the
float tensors a gradient can reach (integer shapes, indices and masks carry none), and :func:`backward` applies
one rule per node, newest first, summing the gradients that reach a tensor along several paths. Subgraphs (an
``If`` branch, a ``Loop`` or ``Scan`` body) count with the outer tensors they read by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import onnx

from onnxcam import contract
from onnxcam_export.builder import FLOAT_TYPES, Branch, Builder, Types
from onnxcam_export.ops import ops_with
from onnxcam_export.vjp import RULES, Grad, Rule, UnsupportedOp

__all__ = ["Branch"]  # (the If branches the walks build; defined with the builder)

FLOATS = FLOAT_TYPES
INTEGER_OPS = ops_with("integer")  # outputs never float, whatever the inputs (for graphs not typed yet)
FLAT_OPS = ops_with("flat")  # float outputs of zero derivative almost everywhere: no gradient passes

Grads = dict[str, list[str]]  # forward tensor -> the gradients that reached it, summed when first read
CONTROL_FLOW = {"If": "branches", "Loop": "body", "Scan": "body"}  # refused by name: no rule reads subgraphs
SPATIAL = [3, 4]  # the h, w axes of gradients [N, T, C, h, w]


# -- the walk ---------------------------------------------------------------------------------------
def rule_for(node: onnx.NodeProto) -> Rule:
    """The gradient rule for ``node``; UnsupportedOp naming the op, the node and the supported ops."""
    where = f"node {node.name or node.output[0]!r}"
    if node.domain in ("", "ai.onnx") and node.op_type in CONTROL_FLOW:
        raise UnsupportedOp(
            f"control flow between the target layer and the logits: {node.op_type} {where}, whose "
            f"{CONTROL_FLOW[node.op_type]} onnxcam does not differentiate. Pick a layer after it with --layer."
        )
    if node.domain not in ("", "ai.onnx") or node.op_type not in RULES:
        supported = ", ".join(sorted(RULES))
        raise UnsupportedOp(
            f"no gradient rule for op {node.op_type!r} (node {node.name or node.output[0]!r}) between the "
            f"target layer and the logits; supported ops: {supported}. Pick a later layer with --layer."
        )
    return RULES[node.op_type]



def input_gradients(b: Builder, node: onnx.NodeProto, dys: list[Grad],
                    rules: Mapping[str, Rule] | None = None) -> list[Grad]:  # fmt: skip
    """One gradient per input of ``node`` from its rule (``rules``' for its op where it has one), given one per
    output (None: no gradient).

    A rule may stop after its last differentiable input; the trailing inputs get None.
    """
    own = rules.get(node.op_type) if rules and node.domain in ("", "ai.onnx") else None
    dxs = list((own or rule_for(node)).vjp(b, node, dys))
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



def backward(b: Builder, nodes: Sequence[onnx.NodeProto], grads: Grads,
             rules: Mapping[str, Rule] | None = None) -> Grads:  # fmt: skip
    """Reverse mode over ``nodes`` (in graph order), newest first, starting from ``grads``.

    A node whose outputs have a gradient passes it to its inputs through its rule (``rules`` override some ops'
    rules: :data:`onnxcam_export.vjp.GUIDED`); only the inputs the builder ``needs`` keep theirs. Returns the
    gradients after the walk (a new map).
    """
    grads = {name: list(parts) for name, parts in grads.items()}
    for node in reversed(nodes):
        dys = [gradient_of(b, grads, name) for name in node.output]
        if all(dy is None for dy in dys):
            continue
        for name, dx in zip(node.input, input_gradients(b, node, dys, rules), strict=True):
            if dx is not None and b.needs(name):
                grads.setdefault(name, []).append(dx)
    return grads



def reached_gradient(b: Builder, grads: Grads, name: str) -> str:
    """The gradient of ``name``, which the walk must have reached."""
    dx = gradient_of(b, grads, name)
    if dx is None:
        raise UnsupportedOp(f"no gradient reaches {name!r} from {contract.LOGITS!r}")
    return dx




# -- the head: the nodes between the target layer and the logits ----------------------------------
def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """A node's graphs: an ``If``'s branches, a ``Loop``'s or ``Scan``'s body."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]



def outer_reads(graph: onnx.GraphProto) -> list[str]:
    """The tensors of enclosing graphs that ``graph``'s nodes read by name."""
    inner, found = {i.name for i in graph.input} | {i.name for i in graph.initializer}, []
    for node in graph.node:
        found += [i for i in inputs_of(node) if i and i not in inner]
        inner.update(node.output)
    return found



def inputs_of(node: onnx.NodeProto) -> list[str]:
    """The tensors ``node`` reads: its inputs, and the outer ones its subgraphs read by name (an ``If`` branch, a
    ``Loop`` or ``Scan`` body), which a walk over node inputs alone would miss."""
    return list(node.input) + [i for graph in subgraphs(node) for i in outer_reads(graph)]



def _gradient_enters(node: onnx.NodeProto, reached: set[str]) -> bool:
    """Whether a gradient can reach ``node``'s outputs from ``reached``: through an input, or through a float path
    inside one of its subgraphs from an outer tensor it reads (a branch that reads a tensor's shape only does not
    carry its gradient)."""
    if reached.intersection(node.input):
        return True
    for graph in subgraphs(node):
        outer = reached.intersection(outer_reads(graph))
        if outer and differentiable(graph.node, outer, None).intersection(o.name for o in graph.output):
            return True
    return False



def head_nodes(graph: onnx.GraphProto, sources: str | set[str], logits: str) -> list[onnx.NodeProto]:
    """The nodes on some path from ``sources`` (a tensor or several) to ``logits``, in graph (topological) order."""
    reached = {sources} if isinstance(sources, str) else set(sources)
    downstream = []
    for node in graph.node:
        if reached.intersection(inputs_of(node)):
            downstream.append(node)
            reached.update(o for o in node.output if o)
    if logits not in reached:
        raise UnsupportedOp(f"tensor {logits!r} does not depend on the target layer {sources!r}")
    needed = {logits}
    head = []
    for node in reversed(downstream):
        if needed.intersection(node.output):
            head.append(node)
            needed.update(inputs_of(node))
    return head[::-1]



def static_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from initializers and constants alone (weights, shapes)."""
    known = {i.name for i in graph.initializer} | {""}
    for node in graph.node:
        if all(i in known for i in inputs_of(node)):
            known.update(node.output)
    return known



def shape_only_tensors(graph: onnx.GraphProto) -> set[str]:
    """:func:`static_tensors` and what is computed from tensor shapes alone (``Shape``, ``Size`` and what follows
    from them and constants: a mask of the input's shape and the position embedding built from it, as HF's DETR
    does). None of it depends on a pixel's value, so no gradient flows through it, even where it changes with the
    batch size and cannot be folded to a constant."""
    known = static_tensors(graph)
    for node in graph.node:
        if node.op_type in ("Shape", "Size") or all(i in known for i in inputs_of(node)):
            known.update(o for o in node.output if o)
    return known



def differentiable(head: Iterable[onnx.NodeProto], sources: set[str], types: Types | None,
                   towards: str | None = None) -> set[str]:  # fmt: skip
    """The float tensors that depend on ``sources`` through float tensors: the only ones a gradient reaches;
    with ``towards`` (the logits), only those with such a path on to it.

    Integer tensors (shapes, indices, masks) and what is computed from them alone carry no gradient,
    except quantized levels (a rule's ``levels``); a tensor of unknown type counts as float unless
    :data:`INTEGER_OPS` computes it. Nor do the outputs of :data:`FLAT_OPS`. A path that reaches the logits
    only through indices (a ReduceMax or TopK that picks the queries a detector keeps, an ArgMax) carries
    none, so its nodes need no rule.
    """
    types, head = types or {}, list(head)

    def floating(node: onnx.NodeProto, name: str) -> bool:
        if node.op_type in RULES and RULES[node.op_type].levels:
            return True
        return types[name].elem_type in FLOATS if name in types else node.op_type not in INTEGER_OPS

    reached = set(sources)
    for node in head:
        if node.op_type not in FLAT_OPS and _gradient_enters(node, reached):
            reached.update(o for o in node.output if o and floating(node, o))
    if towards is None:
        return reached
    onward = {towards} & reached
    for node in reversed(head):
        if onward.intersection(node.output):
            onward.update(reached.intersection(inputs_of(node)))
    return onward



def check_rules(head: Iterable[onnx.NodeProto], wanted: set[str]) -> None:
    """Fail before anything is built when a head node that passes a gradient has no rule."""
    for node in head:
        if wanted.intersection(node.output):
            rule_for(node)



def extra_outputs(node: onnx.NodeProto) -> tuple[str, ...]:
    rule = RULES.get(node.op_type)
    return rule.extra_outputs if rule is not None and node.domain in ("", "ai.onnx") else ()



def expose_extra_outputs(head: Iterable[onnx.NodeProto]) -> None:
    """Give each node the optional outputs its rule reads (MaxPool: Indices), named after its first output."""
    for node in head:
        for index, label in enumerate(extra_outputs(node), start=1):
            node.output.extend([""] * (index + 1 - len(node.output)))
            if not node.output[index]:
                node.output[index] = f"{node.output[0]}/{label}"
