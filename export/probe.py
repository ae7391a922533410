"""Graft-time runs of a model on ONNX Runtime: one quiet probe session, the shapes that ONNX's inference
cannot derive, and the shape arithmetic folded to constants (needs ``onnx``; ``onnxruntime`` is a runtime
dependency of onnxcam anyway)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcam_export.builder import Types, infer_types
from onnxcam_export.walk import shape_only_tensors, static_tensors


def session(model: onnx.ModelProto) -> object:
    """An ONNX Runtime CPU session of the in-memory ``model`` that logs only errors: its notes about unused
    initializers are noise, and a failure is raised and reported by the caller."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def annotate_shapes(
    model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], batch: onnx.TensorShapeProto.Dimension
) -> Types:
    """Fill the shapes ONNX inference cannot derive (e.g. pads computed from Shape ops) by ORT runs.

    ``feeds``: the model's input at its size, at two batch sizes (one for a fixed batch). Every such
    float tensor's shape is recorded in ``value_info``: the axes whose size is the batch size get
    ``batch``, those that otherwise change with it no size, the others their size, so the rules
    see static channel and spatial sizes. Returns
    the types of the model as it leaves (:func:`infer_types`, run again only if the model changed).
    Raises RuntimeError when ONNX Runtime cannot run the model.
    """
    types = infer_types(model)

    def settled(d: onnx.TensorShapeProto.Dimension) -> bool:  # a size, or the batch (also where it is not axis 0)
        return d.HasField("dim_value") or bool(batch.dim_param and d.dim_param == batch.dim_param)

    known = {n for n, t in types.items() if t.HasField("shape") and all(settled(d) for d in t.shape.dim)}
    static = static_tensors(model.graph)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    missing = [o for n in model.graph.node for o in n.output if o in used and o not in known and o not in static]
    if not missing:
        return types
    runs = zip(*[probe(model, missing, feed) for feed in feeds], strict=True)
    recorded = [
        (name, values)
        for name, values in zip(missing, runs, strict=True)
        if all(isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.ndim == values[0].ndim > 0 for v in values)
    ]
    if not recorded:
        return types
    by_name = {v.name: v for v in model.graph.value_info}
    batches = [next(iter(feed.values())).shape[0] for feed in feeds]
    for name, values in recorded:
        first = values[0]
        info = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(first.dtype), list(first.shape))
        for axis, dim in enumerate(info.type.tensor_type.shape.dim):
            sizes = [v.shape[axis] for v in values]
            if sizes == batches and len(set(sizes)) > 1:
                dim.CopyFrom(batch)
            elif len(set(sizes)) > 1:  # follows the batch, but is not it (Swin's windows: N * windows)
                dim.Clear()
        if name in by_name:
            model.graph.value_info.remove(by_name[name])
        model.graph.value_info.append(info)
    return infer_types(model)



def probe(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The values of tensors ``names`` of ``model`` for ``feed``, by one ONNX Runtime run."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.output[:]
    cut.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    try:
        return session(cut).run(names, feed)
    except Exception as exc:  # ORT's own exception types
        raise RuntimeError(str(exc)) from exc


def fold_shape_computations(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> int:
    """Replace what is computed from tensor shapes alone by constants where it is static (in place).

    ``feeds``: the model's input at its size, at two batch sizes. A tensor computed from ``Shape``
    or ``Size`` and constants alone that takes the same value for every feed is static at the
    model's input size: its nodes become initializers (patch counts, head sizes, attention scales),
    so that the rules see constants. What depends on the batch size stays computed. Returns the
    number of tensors folded. Raises RuntimeError when ONNX Runtime cannot run the model.
    """
    graph = model.graph
    static, shaped = static_tensors(graph), shape_only_tensors(graph)
    derived = [o for n in graph.node for o in n.output if o and o in shaped and o not in static]
    if not derived:
        return 0
    runs = [probe(model, derived, feed) for feed in feeds]
    values = {
        name: first
        for name, first, *others in zip(derived, *runs, strict=True)
        if all(np.shape(v) == np.shape(first) and np.array_equal(v, first) for v in others)
    }
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        outputs = [o for o in node.output if o]
        if outputs and all(o in values for o in outputs):
            graph.initializer.extend(numpy_helper.from_array(np.asarray(values[o]), o) for o in outputs if o in used)
        else:
            kept.append(node)
    remove_unused(graph, kept, set(derived))
    return sum(1 for name in derived if name in values)



def remove_unused(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], removable: set[str]) -> None:
    """Set the graph's nodes to ``nodes`` less those whose outputs are all ``removable`` and read by nobody."""
    while True:
        used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in nodes if all(o in removable and o not in used for o in n.output if o)]
        if not dead:
            break
        nodes = [n for n in nodes if n not in dead]
    del graph.node[:]
    graph.node.extend(nodes)
    names = {i for n in nodes for i in n.input}
    unused = [i for i in graph.initializer if i.name in removable and i.name not in names]
    for init in unused:
        graph.initializer.remove(init)
