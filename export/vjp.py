"""Vector-Jacobian rules, one per ONNX op type, emitting only default-domain ONNX ops.

Each rule gets the builder, the forward node and the gradient of each node output
(``None`` where no gradient flows) and returns one gradient per node input (``None``
where none is needed). Gradients carry a target axis at position 1 (see ``builder``).
The math of each rule is the comment above it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from onnxcam_export.builder import Builder

Grad = str | None
Rule = Callable[[Builder, onnx.NodeProto, list[Grad]], list[Grad]]


class UnsupportedOp(ValueError):
    """A node on the path from the target layer to the logits has no rule (or an unsupported form)."""


def attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _unsupported(node: onnx.NodeProto, why: str) -> UnsupportedOp:
    return UnsupportedOp(f"{node.op_type} node {node.name or node.output[0]!r}: {why}")


def _mask(b: Builder, dy: str, keep: str, like: str) -> str:
    """``dy`` where ``keep``, else 0 (``like``: a forward tensor of the same element type)."""
    return b.op("Where", keep, dy, b.scalar(0.0, like))


# dX = dY
def Identity(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    return [dy[0]] + [None] * (len(node.input) - 1)


# dX = dY  (inference: dropout is the identity; the optional mask output has no gradient)
def Dropout(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    if len(node.input) > 2 and node.input[2]:
        mode = b.constant_value(node.input[2])
        if mode is None or bool(mode):
            raise _unsupported(node, "training_mode must be a constant false for an inference graph")
    return Identity(b, node, dy)


# dX = dY * (Y > 0)
def Relu(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    y = node.output[0]
    return [_mask(b, dy[0], b.op("Greater", b.fwd(y), b.scalar(0.0, y)), y)]


# dX = dY * (min < X < max)   (strict, as torch's hardtanh/relu6 backward)
def Clip(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    a = attrs(node)
    bounds = [node.input[i] if len(node.input) > i and node.input[i] else None for i in (1, 2)]
    if b.opset < 11:
        bounds = [
            b.scalar(float(a.get("min", -np.inf)), x) if "min" in a else None,
            b.scalar(float(a.get("max", np.inf)), x) if "max" in a else None,
        ]
    keep = None
    for bound, cmp in zip(bounds, ("Greater", "Less"), strict=True):
        if bound is not None:
            inside = b.op(cmp, b.fwd(x), bound)
            keep = inside if keep is None else b.op("And", keep, inside)
    grads: list[Grad] = [dy[0] if keep is None else _mask(b, dy[0], keep, x)]
    return grads + [None] * (len(node.input) - 1)


def _reshape_back(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    return [b.op("Reshape", dy[0], b.grad_shape(dy[0], node.input[0]))] + [None] * (len(node.input) - 1)


# dX = reshape(dY, [N, T] + X.shape[1:])   (the batch axis must stay first and alone)
def Flatten(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    axis = int(attrs(node).get("axis", 1))
    if axis % b.rank(node.input[0]) != 1:
        raise _unsupported(node, f"axis={axis} does not keep the batch axis alone; only axis=1 is supported")
    return _reshape_back(b, node, dy)


# dX = reshape(dY, [N, T] + X.shape[1:])   (the batch axis must stay first and alone)
def Reshape(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x, y = b.shape(node.input[0]), b.shape(node.output[0])
    if x and y and x[0] is not None and y[0] is not None and x[0] != y[0]:
        raise _unsupported(node, f"it changes the batch axis ({x[0]} -> {y[0]}); only reshapes that keep it")
    return _reshape_back(b, node, dy)


# Y = alpha * A' B' + beta * C  =>  dA = alpha * dY B'^T   (A is the batch input, B and C constants)
def Gemm(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a = attrs(node)
    if int(a.get("transA", 0)):
        raise _unsupported(node, "transA=1 puts the batch on axis 1 of A; only transA=0 is supported")
    # B' = B^T when transB else B, so dA = dY @ B when transB else dY @ B^T
    weight = node.input[1] if int(a.get("transB", 0)) else b.op("Transpose", node.input[1])
    da = b.op("MatMul", dy[0], weight)
    alpha = float(a.get("alpha", 1.0))
    if alpha != 1.0:
        da = b.op("Mul", da, b.scalar(alpha, node.input[0]))
    return [da] + [None] * (len(node.input) - 1)


# Y = A @ B with constant B  =>  dA = dY @ B^T
def MatMul(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    rank = b.rank(node.input[1])
    perm = [*list(range(rank - 2)), rank - 1, rank - 2]
    return [b.op("MatMul", dy[0], b.op("Transpose", node.input[1], perm=perm)), None]


# Each input element receives the gradient of the outputs whose window picked it
# (Indices output, flat over N*C*H*W): dX = scatter_add(zeros, Indices mod H*W, dY).
def MaxPool(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    if len(node.output) < 2 or not node.output[1]:
        raise _unsupported(node, "the grafter must add the Indices output before the rule runs")
    if int(attrs(node).get("storage_order", 0)):
        raise _unsupported(node, "storage_order=1 (column-major indices) is not supported")
    x = node.input[0]
    plane = b.op("ReduceProd", b.dims(x, 2), keepdims=1)  # H*W of the input
    flat = b.op("Reshape", node.output[1], b.op("Concat", b.dims(x, 0, 2), b.ints([-1]), axis=0))
    idx = b.op("Mod", flat, plane)  # [N, C, hw], now within each H*W plane
    head = b.dims(dy[0], 0, 3)  # [N, T, C]
    updates = b.op("Reshape", dy[0], b.op("Concat", head, b.ints([-1]), axis=0))  # [N, T, C, hw]
    idx = b.op("Expand", b.fwd(idx), b.op("Shape", updates))
    zeros = b.op(
        "ConstantOfShape",
        b.op("Concat", head, plane, axis=0),
        value=helper.make_tensor("zero", b.elem_type(x), [1], [0]),
    )
    dx = b.op("ScatterElements", zeros, idx, updates, axis=3, reduction="add")
    return [b.op("Reshape", dx, b.grad_shape(dy[0], x))]


def _fold_targets(b: Builder, dy: str) -> tuple[str, str]:
    """[N, T, C, h, w] -> [N*T, C, h, w], and the [N, T] head to unfold with."""
    return b.op("Reshape", dy, b.op("Concat", b.ints([-1]), b.dims(dy, 2), axis=0)), b.dims(dy, 0, 2)


# Transpose of the averaging: dX = ConvTranspose(dY / count, ones), one filter per channel.
def AveragePool(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a = attrs(node)
    x = node.input[0]
    shape = b.shape(x)
    if shape is None or any(d is None for d in shape[1:]):
        raise _unsupported(node, "needs static channel and spatial sizes (export with a fixed input size)")
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    strides = list(a.get("strides", [1] * nd))
    pads = list(a.get("pads", [0] * 2 * nd))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or any(d != 1 for d in a.get("dilations", [1])):
        raise _unsupported(node, "auto_pad and dilations are not supported; export with explicit pads")
    if kernel == [1] * nd and strides == [1] * nd and not any(pads):
        return [dy[0]]
    spatial = shape[2:]
    out = b.shape(node.output[0])[2:]
    # count[o] = how many input (or padded, when count_include_pad) cells window o averaged
    counts = np.ones(out, dtype=np.float64)
    if not int(a.get("count_include_pad", 0)):
        for axis in range(nd):
            starts = np.arange(out[axis]) * strides[axis] - pads[axis]
            lo, hi = np.maximum(starts, 0), np.minimum(starts + kernel[axis], spatial[axis])
            counts = counts * (hi - lo).reshape([-1 if i == axis else 1 for i in range(nd)])
    else:
        counts *= np.prod(kernel)
    full = [(out[i] - 1) * strides[i] + kernel[i] - pads[i] - pads[i + nd] for i in range(nd)]
    extra = [spatial[i] - full[i] for i in range(nd)]
    if any(e < 0 or 0 < strides[i] <= e for i, e in enumerate(extra)):
        raise _unsupported(node, f"ceil_mode windows past the padded input are not supported (extra={extra})")
    channels = shape[1]
    folded, head = _fold_targets(b, dy[0])
    scaled = b.op("Div", folded, b.const(counts.astype(b.np_dtype(x)), "pool_count"))
    ones = b.const(np.ones([channels, 1, *kernel], dtype=b.np_dtype(x)), "pool_ones")
    dx = b.op(
        "ConvTranspose", scaled, ones, group=channels, strides=strides, pads=pads, output_padding=extra,
        kernel_shape=kernel,
    )  # fmt: skip
    return [b.op("Reshape", dx, b.op("Concat", head, b.dims(x, 1), axis=0))]


def _explicit_pads(
    a: dict, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]
) -> list[int]:
    """Begin/end pads of a Conv/pool node, with auto_pad SAME_* / VALID made explicit."""
    nd = len(kernel)
    mode = a.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("NOTSET", ""):
        return list(a.get("pads", [0] * 2 * nd))
    if mode == "VALID":
        return [0] * 2 * nd
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin + end


# dX = ConvTranspose(dY, W) with the forward strides, pads, dilations and groups;
# output_padding restores input cells that no window reached.
def Conv(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a = attrs(node)
    x, weight = node.input[0], node.input[1]
    shape, w_shape = b.shape(x), b.shape(weight)
    if shape is None or w_shape is None or any(d is None for d in shape[1:] + w_shape):
        raise _unsupported(node, "needs static input and weight shapes (export with a fixed input size)")
    kernel = list(a.get("kernel_shape", w_shape[2:]))
    nd = len(kernel)
    strides, dilations = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    pads = _explicit_pads(a, shape[2:], kernel, strides, dilations)
    out = b.shape(node.output[0])[2:]
    reach = [(out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - pads[i] - pads[i + nd] for i in range(nd)]
    extra = [shape[2 + i] - reach[i] for i in range(nd)]
    folded, head = _fold_targets(b, dy[0])
    dx = b.op(
        "ConvTranspose", folded, weight, group=int(a.get("group", 1)), strides=strides, pads=pads,
        dilations=dilations, kernel_shape=kernel, output_padding=extra,
    )  # fmt: skip
    return [b.op("Reshape", dx, b.op("Concat", head, b.dims(x, 1), axis=0))] + [None] * (len(node.input) - 1)


# dX = expand(dY) / (H * W)
def GlobalAveragePool(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    plane = b.op("Cast", b.op("ReduceProd", b.dims(x, 2), keepdims=1), to=b.elem_type(x))
    return [b.op("Div", b.op("Expand", dy[0], b.grad_shape(dy[0], x)), plane)]


# dX = expand(dY with the reduced axes kept) / (number of reduced elements)
def ReduceMean(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a = attrs(node)
    x = node.input[0]
    rank = b.rank(x)
    if len(node.input) > 1 and node.input[1]:
        value = b.constant_value(node.input[1])
        if value is None:
            raise _unsupported(node, "axes must be a constant")
        axes = [int(v) for v in value]
    else:
        axes = list(a.get("axes", []))
    if not axes and int(a.get("noop_with_empty_axes", 0)):
        return [dy[0]] + [None] * (len(node.input) - 1)
    axes = sorted(ax % rank for ax in axes) if axes else list(range(rank))
    if 0 in axes:
        raise _unsupported(node, "it reduces over the batch axis")
    g = dy[0] if int(a.get("keepdims", 1)) else b.unsqueeze(dy[0], [ax + 1 for ax in axes])
    shape = b.op("Shape", x)
    count = b.op("ReduceProd", b.op("Gather", shape, b.ints(axes)), keepdims=1)
    expanded = b.op("Expand", g, b.grad_shape(dy[0], x))
    return [b.op("Div", expanded, b.op("Cast", count, to=b.elem_type(x)))] + [None] * (len(node.input) - 1)


# Inference batch norm is per-channel affine: dX = dY * scale / sqrt(var + eps)
def BatchNormalization(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    eps = float(attrs(node).get("epsilon", 1e-5))
    if int(attrs(node).get("training_mode", 0)):
        raise _unsupported(node, "training_mode=1 is not an inference graph")
    factor = b.op("Div", node.input[1], b.op("Sqrt", b.op("Add", node.input[4], b.scalar(eps, x))))
    factor = b.op("Reshape", factor, b.ints([-1] + [1] * (b.rank(x) - 2)))
    return [b.op("Mul", dy[0], factor)] + [None] * (len(node.input) - 1)


RULES: dict[str, Rule] = {
    rule.__name__: rule
    for rule in (
        Identity, Dropout, Relu, Clip, Flatten, Reshape, Gemm, MatMul, MaxPool, AveragePool, Conv,
        GlobalAveragePool, ReduceMean, BatchNormalization,
    )
}  # fmt: skip
