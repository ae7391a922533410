"""The finished map inside the graph: the ``saliency`` output, for hosts without Python.

For each method flagged ``in_graph`` in :data:`onnxcam.methods.METHODS`, one function here emits
its channel sum ``S = sum_k W_k`` ``[N, T, h, w]`` from the graph's ``activations`` ``A``,
``weights`` and ``gradients`` ``G`` (the formulas are those of :mod:`onnxcam.methods`); then
:func:`add_saliency` finishes the map as the Python path does (:mod:`onnxcam.maps`): ReLU,
bilinear resize to the model's input size with OpenCV's pixel-centre convention
(``half_pixel``), min-max per map with an all-zero map kept at zero. Everything sits in an
``If`` on ``return_saliency`` (default false), so a call that does not ask pays nothing; a
nested ``If`` chain on ``saliency_method`` picks the method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxcam import contract
from onnxcam.maps import FLAT, finest
from onnxcam.methods import EPS, METHODS
from onnxcam_export.builder import Builder


@dataclass(frozen=True)
class Tensors:
    """The graph's outputs a method reads, in float64 as in :func:`onnxcam.methods.cam`."""

    a: str  # activations [N, C, h, w]
    a5: str  # activations as [N, 1, C, h, w], broadcastable against g
    g: str  # gradients [N, T, C, h, w] (empty unless the method needs them)
    w: str  # Grad-CAM channel weights [N, T, C]


Emit = Callable[[Builder, Tensors], str]  # -> the channel sum S [N, T, h, w] (float64) before the ReLU


def _s(b: Builder, value: float) -> str:
    return b.const(np.asarray(value, dtype=np.float64), "scalar")


def _channel_sum(b: Builder, weighted: str) -> str:
    return b.reduce("ReduceSum", weighted, [2], keepdims=0)


def _hw_sum(b: Builder, x: str) -> str:
    return b.reduce("ReduceSum", x, [3, 4], keepdims=1)


# S = sum_k alpha_k A_k with alpha = the graph's weights [N, T, C]: one MatMul with A as [N, C, h*w]
def gradcam(b: Builder, t: Tensors) -> str:
    flat = b.op("Reshape", t.a, b.op("Concat", b.dims(t.a, 0, 2), b.product(t.a, 2), axis=0))
    summed = b.op("MatMul", t.w, flat)  # [N, T, h*w]
    return b.op("Reshape", summed, b.op("Concat", b.dims(t.w, 0, 2), b.dims(t.a, 2), axis=0))


# a_ij = G^2 / (2 G^2 + sum_hw(A) G^3), 0 where that is 0; alpha = sum_hw(a_ij ReLU(G)); S = sum_k alpha_k A_k
def gradcam_plus_plus(b: Builder, t: Tensors) -> str:
    g2 = b.op("Mul", t.g, t.g)
    g3 = b.op("Mul", g2, t.g)
    denominator = b.op("Add", b.op("Mul", g2, _s(b, 2.0)), b.op("Mul", _hw_sum(b, t.a5), g3))
    nonzero = b.op("Not", b.op("Equal", denominator, _s(b, 0.0)))
    safe = b.op("Where", nonzero, denominator, _s(b, 1.0))
    aij = b.op("Where", nonzero, b.op("Div", g2, safe), _s(b, 0.0))
    alpha = _hw_sum(b, b.op("Mul", aij, b.op("Relu", t.g)))
    return _channel_sum(b, b.op("Mul", alpha, t.a5))


# alpha = sum_hw(G A) / (sum_hw(A) + eps); S = sum_k alpha_k A_k
def xgradcam(b: Builder, t: Tensors) -> str:
    numerator = _hw_sum(b, b.op("Mul", t.g, t.a5))
    alpha = b.op("Div", numerator, b.op("Add", _hw_sum(b, t.a5), _s(b, EPS)))
    return _channel_sum(b, b.op("Mul", alpha, t.a5))


# S = sum_k G_k A_k
def hirescam(b: Builder, t: Tensors) -> str:
    return _channel_sum(b, b.op("Mul", t.g, t.a5))


# S = sum_k ReLU(G_k A_k)
def gradcam_elementwise(b: Builder, t: Tensors) -> str:
    return _channel_sum(b, b.op("Relu", b.op("Mul", t.g, t.a5)))


# S = sum_k ReLU(G_k) A_k
def layercam(b: Builder, t: Tensors) -> str:
    return _channel_sum(b, b.op("Mul", b.op("Relu", t.g), t.a5))


EMIT: dict[str, Emit] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_plus_plus,
    "xgradcam": xgradcam,
    "hirescam": hirescam,
    "gradcam-elementwise": gradcam_elementwise,
    "layercam": layercam,
}


def _choose(b: Builder, t: Tensors, methods: Sequence[str], first: int = 0) -> str:
    """The channel sum of method ``saliency_method`` among ``methods[first:]`` (the last one for any later index)."""
    if first == len(methods) - 1:
        return EMIT[methods[first]](b, t)
    chosen = b.op("Equal", contract.SALIENCY_METHOD, first)
    with b.subgraph() as then_nodes:
        then = EMIT[methods[first]](b, t)
    with b.subgraph() as else_nodes:
        otherwise = _choose(b, t, methods, first + 1)
    out = b.fresh(f"saliency/{methods[first]}_or_later")
    b.if_(chosen, (then_nodes, then), (else_nodes, otherwise), out, TensorProto.DOUBLE)
    return out


def _float64(b: Builder, scale: int = 0) -> Tensors:
    """The method inputs of the target layer (``scale`` 0) or of extra layer ``scale``, cast to float64 (their
    sums over channels cancel: float32 would lose ~1e-5)."""
    names = (contract.ACTIVATIONS, contract.GRADIENTS, contract.WEIGHTS)
    a, g, w = (b.op("Cast", x if not scale else contract.scale_output(x, scale), to=TensorProto.DOUBLE)
               for x in names)  # fmt: skip
    return Tensors(a=a, a5=b.unsqueeze(a, [1]), g=g, w=w)


def _min_max(b: Builder, cam: str) -> str:
    """Each ``[h, w]`` map of float32 ``cam`` scaled to [0, 1], an all-zero (or constant) one kept at zero, as
    :func:`onnxcam.maps.normalize`."""
    low = b.reduce("ReduceMin", cam, [2, 3], keepdims=1)
    span = b.op("Sub", b.reduce("ReduceMax", cam, [2, 3], keepdims=1), low)
    zero, one = b.scalar(0.0, cam), b.scalar(1.0, cam)
    flat = b.op("Not", b.op("Greater", span, b.scalar(FLAT, cam)))  # (a NaN span is flat too)
    # an all-zero (or constant) map is zero after the Sub: dividing it by 1 keeps it so, never NaN; a division
    # (not a product with 1 / span) makes the peak exactly 1
    scaled = b.op("Div", b.op("Sub", cam, low), b.op("Where", flat, one, span))
    return b.op("Clip", scaled, zero, one)


def _resize(b: Builder, cam: str, size: Sequence[int]) -> str:
    """Bilinear resize of float32 ``[N, T, h, w]`` to ``size``, with OpenCV's pixel centres (``half_pixel``)."""
    sizes = b.op("Concat", b.dims(cam, 0, 2), b.ints(list(size)), axis=0)
    empty = b.const(np.zeros(0, dtype=np.float32), "empty")
    return b.op("Resize", cam, empty, empty, sizes, mode="linear", coordinate_transformation_mode="half_pixel")


def _aggregate(b: Builder, sums: list[str], grid: tuple[int, int]) -> str:
    """Several layers' channel sums as one ``[N, T, h, w]`` map at the finest ``grid``: each ReLU'd, min-max
    scaled, upsampled and averaged over the layers, as :func:`onnxcam.maps.aggregate` (pytorch-grad-cam's)."""
    scaled = [_resize(b, _min_max(b, b.op("Cast", b.op("Relu", s), to=TensorProto.FLOAT)), grid) for s in sums]
    total = b.op("Sum", *[b.op("Cast", s, to=TensorProto.DOUBLE) for s in scaled])
    return b.op("Div", total, _s(b, float(len(sums))))


def finish(b: Builder, summed: str, size: tuple[int, int]) -> str:
    """ReLU, bilinear resize to ``size`` (OpenCV's INTER_LINEAR centres), min-max per map, float32.

    The minimum is subtracted in float64 before the resize, as :func:`onnxcam.maps.finish` does.
    """
    cam = b.op("Relu", summed)
    cam = b.op("Cast", b.op("Sub", cam, b.reduce("ReduceMin", cam, [2, 3], keepdims=1)), to=TensorProto.FLOAT)
    return _min_max(b, _resize(b, cam, size))


def saliency_methods() -> list[str]:
    """The in-graph methods, in ``saliency_method`` order (the method records decide which)."""
    names = [name for name, m in METHODS.items() if m.in_graph]
    missing = [name for name in names if name not in EMIT]
    if missing:
        raise RuntimeError(f"methods {missing} are flagged in_graph but onnxcam_export.saliency has no ONNX form")
    return names


def gradients_condition(b: Builder) -> str:
    """When the full gradient is built: ``full_gradients``, or a saliency call whose method needs it."""
    needs = np.asarray([METHODS[m].uses == "gradients" for m in saliency_methods()])
    wanted = b.op("Gather", b.const(needs, "saliency_needs_gradients"), contract.SALIENCY_METHOD)
    return b.op("Or", contract.FULL_GRADIENTS, b.op("And", contract.RETURN_SALIENCY, wanted))


def add_saliency(
    graph: onnx.GraphProto, b: Builder, size: tuple[int, int], grids: Sequence[tuple[int, int]] = ()
) -> None:
    """Emit the ``saliency`` output behind an ``If`` on ``return_saliency``, and its two (required) inputs.

    It reads ``gradients`` (and each extra layer's): the caller builds them under :func:`gradients_condition`.
    ``grids``: the ``(h, w)`` of each target layer where there are several (a detector's scales), whose maps are
    aggregated first.
    """
    methods = saliency_methods()
    with b.subgraph() as then_nodes:
        sums = [_choose(b, _float64(b, scale), methods) for scale in range(max(len(grids), 1))]
        summed = sums[0] if len(sums) == 1 else _aggregate(b, sums, finest(grids))
        finished = finish(b, summed, size)
    emit_saliency(graph, b, (then_nodes, finished))


def emit_saliency(graph: onnx.GraphProto, b: Builder, finished: tuple[list[onnx.NodeProto], str]) -> None:
    """The ``saliency`` output: the branch ``finished`` (its nodes and its ``[N, T, H, W]`` map) where
    ``return_saliency``, else ``[N, T, 0, 0]``; and the two inputs that ask for it."""
    with b.subgraph() as else_nodes:
        shape = b.op("Concat", b.op("Shape", contract.TARGET_CLASSES), b.ints([0, 0]), axis=0)
        skipped = b.op("ConstantOfShape", shape, value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0]))
    b.if_(contract.RETURN_SALIENCY, finished, (else_nodes, skipped), contract.SALIENCY, TensorProto.FLOAT)
    # required inputs, not initializers with a default: JavaScript's ONNX Runtime cannot override those
    graph.input.append(helper.make_tensor_value_info(contract.RETURN_SALIENCY, TensorProto.BOOL, []))
    graph.input.append(helper.make_tensor_value_info(contract.SALIENCY_METHOD, TensorProto.INT64, []))
