"""Writing a grafted model: its model card as metadata, the ONNX checker, an atomic write."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import onnx

from onnxcam import contract
from onnxcam.contract import ModelCard
from onnxcam.errors import OnnxcamError
from onnxcam.outputs import atomic_write
from onnxcam_export.builder import PREFIX, infer_types
from onnxcam_export.ops import ops_with
from onnxcam_export.saliency import saliency_methods
from onnxcam_export.walk import inputs_of, outer_reads, subgraphs

QUANTIZED_OPS = ops_with("quantized")  # ONNX Runtime's QDQ pairs (default domain) and QOperator ops (QLinear*)
NO_EMPTY_BATCH = ops_with("no_empty_batch")  # ops ONNX Runtime cannot run on an empty batch (LSTM)


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every branch and body inside it."""
    return [graph, *(inner for node in graph.node for body in subgraphs(node) for inner in _graphs(body))]


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and those of every branch and body inside them."""
    return [node for g in _graphs(graph) for node in g.node]


def _branch_constants(graph: onnx.GraphProto) -> None:
    """Move each initializer that only ``If`` branches read into those branches (a copy in each).

    ONNX Runtime lays a Conv out in its blocked NCHWc format only when its weight is an initializer of the Conv's
    own graph, not one the branch reads from the outer scope: the backward to the input (``--pixels``), in its own
    ``If``, ran its convolutions at half the speed until their flipped kernels moved in (EfficientNet-Lite0's
    saliency call on AMD EPYC, AVX-512: 39 ms, then 32 ms).
    """
    # (what else reads a constant: a node by name, a Loop's or Scan's body from the outer scope, the graph's ends)
    outer = {name for node in graph.node for name in (node.input if node.op_type == "If" else inputs_of(node))}
    outer |= {v.name for v in [*graph.input, *graph.output]}
    branches = [g for node in graph.node if node.op_type == "If" for g in subgraphs(node)]
    reads = [set(outer_reads(branch)) for branch in branches]
    for index in reversed(range(len(graph.initializer))):  # (deleted in place: a copy of all past 2 GB cannot be made)
        tensor = graph.initializer[index]
        readers = [b for b, names in zip(branches, reads, strict=True) if tensor.name in names]
        if tensor.name in outer or not readers:
            continue
        for branch in readers:
            branch.initializer.append(tensor)
        del graph.initializer[index]


def save_explainer(model: onnx.ModelProto, card: ModelCard, out: Path) -> ModelCard:
    """Store ``card`` as ``onnxcam.*`` metadata, check the graph, write ``out`` through a temporary name.

    A graph with the ``saliency`` output gets its methods listed in the card (``saliency_methods``, unless the
    card lists them: a gradient-free file's), one with integer kernels is ``quantized``, one with an op ONNX
    Runtime cannot run on an empty batch has ``empty_batch`` false, one whose weights ONNX Runtime should pre-pack
    (:func:`onnxcam.engine.without_prepacking`: integer kernels, or :func:`_products_over_rows`) has ``prepack``.
    A similarity model's references lose their default: every call gives them. Returns the card as written.
    """
    inputs = {i.name for i in model.graph.input}
    # a similarity model's references: an input with no default in the file (onnxruntime-web cannot replace an
    # initializer, so the browser page could not give its prompts); the graft's analyses took the default as data
    kept = [t for t in model.graph.initializer if not (t.name == contract.REFERENCES and t.name in inputs)]
    if len(kept) < len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    _branch_constants(model.graph)
    if any(o.name == contract.SALIENCY for o in model.graph.output) and not card.saliency_methods:
        card = dataclasses.replace(card, saliency_methods=tuple(saliency_methods()))
    ops = {n.op_type for n in _all_nodes(model.graph)}
    quantized = bool(ops & QUANTIZED_OPS)
    card = dataclasses.replace(card, quantized=quantized, empty_batch=not ops & NO_EMPTY_BATCH,
                               prepack=quantized or _products_over_rows(model))  # fmt: skip
    del model.metadata_props[:]
    for key, value in card.to_metadata().items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    out.parent.mkdir(parents=True, exist_ok=True)
    if sum(_size(t) for g in _graphs(model.graph) for t in g.initializer) > EXTERNAL_DATA_BYTES:
        _save_with_external_data(model, out)  # (checked as saved: a protobuf over 2 GB cannot be checked in memory)
    else:
        check(model)
        atomic_write(out, lambda tmp: onnx.save(model, tmp))
    return card


def _products_over_rows(model: onnx.ModelProto) -> bool:
    """Whether a MatMul of the source model multiplies a constant weight by many rows per image (a transformer's
    tokens: ``[N, L, C]`` or more axes), where packing the weight once is faster than on every call. A classifier
    head's ``[N, C]`` is one row per image; the grafted backward's products are not counted: their ``[N, T, C]``
    rows are targets, and packing would copy the weights they share with the forward (VGG16's FC1)."""
    weights = {t.name for t in model.graph.initializer}
    try:
        types = infer_types(model)
    except onnx.shape_inference.InferenceError:  # (ranks unknown: pre-packing stays off, as for any float model)
        return False
    return any(n.op_type == "MatMul" and not n.name.startswith(PREFIX) and n.input[1] in weights and n.input[0] in types
               and len(types[n.input[0]].shape.dim) >= 3 for n in model.graph.node)  # fmt: skip


def _size(tensor: onnx.TensorProto) -> int:
    """A weight's bytes; protobuf cannot size (serialise) a message past 2 GB, so raw bytes are counted as such."""
    return len(tensor.raw_data) if tensor.raw_data else tensor.ByteSize()


def check(model: onnx.ModelProto | Path) -> None:
    """ONNX's full checker on a model or a saved file; what it finds is a one-line OnnxcamError."""
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OnnxcamError(f"the grafted model fails ONNX's checker ({first[:300]}); nothing was written. The source "
                           "graph may be malformed (check it with onnx.checker), else this is a graft bug: report "
                           "it with the model's layout") from None  # fmt: skip


# Weights above this go to ``<model>.data`` beside the model (ONNX's external data, which every runtime reads):
# ONNX Runtime maps that file instead of copying it out of the protobuf. One VGG16 explain peaks at 0.69 GB
# instead of 1.00 GB for its 562 MB of weights, and starts in 0.4 s instead of 3.2 s (benchmarks/startup.py).
EXTERNAL_DATA_BYTES = 100_000_000


def _save_with_external_data(model: onnx.ModelProto, out: Path) -> None:
    """``out`` and ``out.data``, written in a temporary folder beside them and renamed, the weights first."""
    data = out.with_name(out.name + ".data")
    umask = os.umask(0)
    os.umask(umask)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as folder:
        staged = Path(folder) / out.name
        onnx.save(model, staged, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                  size_threshold=1024)  # fmt: skip
        check(staged)
        for name, target in ((data.name, data), (out.name, out)):
            os.chmod(Path(folder) / name, 0o666 & ~umask)
            os.replace(Path(folder) / name, target)
