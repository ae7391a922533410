"""Vector-Jacobian rules, one per ONNX op type, emitting only default-domain ONNX ops.

Each rule gets the builder, the forward node and the gradient of each node output
(``None`` where no gradient flows) and returns one gradient per node input (``None``
where none is needed). A rule may stop after its last differentiable input: the walker
(:func:`onnxcam_export.walk.input_gradients`) pads the list with ``None`` for the trailing
inputs (weights, shapes, axes) and refuses a list longer than the inputs. Gradients carry a
target axis at position 1 (see ``builder``). The math of each rule is the comment above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxcam_export.builder import Builder

Grad = str | None
VJP = Callable[[Builder, onnx.NodeProto, list[Grad]], list[Grad]]


@dataclass(frozen=True)
class Rule:
    """One op's VJP and the optional forward outputs it reads.

    ``extra_outputs`` names the optional outputs after the first that only the backward
    pass reads (MaxPool: its ``Indices``): the grafter adds those a node lacks, and the
    head-only copy of the graph leaves them out. ``levels``: the op's integer output stands for
    real values (QuantizeLinear's quantized levels), so the gradient passes through it, where
    other integer tensors (shapes, indices) carry none.
    """

    vjp: VJP
    extra_outputs: tuple[str, ...] = ()
    levels: bool = False


class UnsupportedOp(ValueError):
    """A node on the path from the target layer to the logits has no rule (or an unsupported form)."""


def attrs(node: onnx.NodeProto) -> dict[str, object]:
    """The node's attributes by name; string attributes (bytes in the protobuf) as str."""
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {name: v.decode() if isinstance(v, bytes) else v for name, v in values.items()}


def _unsupported(node: onnx.NodeProto, why: str) -> UnsupportedOp:
    return UnsupportedOp(f"{node.op_type} node {node.name or node.output[0]!r}: {why}")


def _mask(b: Builder, dy: str, keep: str, like: str) -> str:
    """``dy`` where ``keep``, else 0 (``like``: a forward tensor of the same element type)."""
    return b.op("Where", keep, dy, b.scalar(0.0, like))


# dX = dY
def Identity(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    return [dy[0]]


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
    return [dy[0] if keep is None else _mask(b, dy[0], keep, x)]


def _swap_front(b: Builder, g: str, x: str) -> str:
    """Swap the first two axes of ``g``, a gradient of forward tensor ``x``: [X0, T, X1, ...] <-> [T, X0, X1, ...]."""
    return b.op("Transpose", g, perm=[1, 0, *range(2, b.rank(x) + 1)])


def _reshape_back(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x, y = node.input[0], node.output[0]
    if b.same_dim(x, y, 0):  # axis 0 keeps its index, so the target axis can stay at 1
        return [b.op("Reshape", dy[0], b.grad_shape(dy[0], x))]
    front = _swap_front(b, dy[0], y)  # [T, Y...] -> [T, X...] -> [X0, T, X1...]
    back = b.op("Reshape", front, b.op("Concat", b.dims(front, 0, 1), b.op("Shape", x), axis=0))
    return [_swap_front(b, back, x)]


# dX = reshape(dY, [X0, T] + X.shape[1:]), through [T, ...] when the reshape moves what axis 0 holds
Flatten = Reshape = Squeeze = Unsqueeze = _reshape_back


# Y = alpha * A' B' + beta * C  =>  dA = alpha * dY B'^T   (A is the batch input, B and C constants)
def Gemm(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a = attrs(node)
    if int(a.get("transA", 0)):
        raise _unsupported(node, "transA=1 puts the batch on axis 1 of A; only transA=0 is supported")
    # B' = B^T when transB else B, so dA = dY @ B when transB else dY @ B^T
    weight = b.weight(node.input[1])
    weight = weight if int(a.get("transB", 0)) else b.op("Transpose", weight)
    da = b.op("MatMul", dy[0], weight)
    alpha = float(a.get("alpha", 1.0))
    if alpha != 1.0:
        da = b.op("Mul", da, b.scalar(alpha, node.input[0]))
    return [da]


def _transpose_last(b: Builder, t: str, rank: int) -> str:
    return b.op("Transpose", t, perm=[*range(rank - 2), rank - 1, rank - 2])


# Y = A @ B  =>  dA = dY @ B^T, dB = A^T @ dY  (batch axes broadcast, each summed back to its input's shape)
def MatMul(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a, c = node.input
    out = node.output[0]
    if b.rank(a) < 2 or b.rank(c) < 2:
        raise _unsupported(node, "1-D operands are not supported")

    def transposed(t: str) -> str:  # a forward operand, its last two axes swapped; a weight has no batch axis
        batched = b.rank(t) == b.rank(out) and b.constant_value(t) is None
        return _transpose_last(b, b.fwd(t) if batched else b.weight(t), b.rank(t) + batched)

    da = b.op("MatMul", dy[0], transposed(c)) if b.needs(a) else None
    dc = b.op("MatMul", transposed(a), dy[0]) if b.needs(c) else None
    return [None if g is None else _unbroadcast(b, node, g, x, core=2) for g, x in ((da, a), (dc, c))]


# Each input element receives the gradient of the outputs whose window picked it
# (Indices output, flat over N*C*H*W): dX = scatter_add(zeros, Indices mod H*W, dY).
def MaxPool(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    if len(node.output) < 2 or not node.output[1]:
        raise _unsupported(node, "the grafter must add the Indices output before the rule runs")
    if int(attrs(node).get("storage_order", 0)):
        raise _unsupported(node, "storage_order=1 (column-major indices) is not supported")
    x = node.input[0]
    plane = b.product(x, 2)  # H*W of the input
    out = node.output[0]
    flat = b.op("Reshape", node.output[1], b.op("Concat", b.dims(x, 0, 2), b.product(out, 2), axis=0))
    idx = b.op("Mod", flat, plane)  # [N, C, hw], now within each H*W plane
    head = b.dims(dy[0], 0, 3)  # [N, T, C]
    updates = b.op("Reshape", dy[0], b.op("Concat", head, b.product(out, 2), axis=0))  # [N, T, C, hw]
    idx = b.op("Expand", b.fwd(idx), b.op("Shape", updates))
    zeros = b.zeros(b.op("Concat", head, plane, axis=0), like=x)
    dx = b.op("ScatterElements", zeros, idx, updates, axis=3, reduction="add")
    return [b.op("Reshape", dx, b.grad_shape(dy[0], x))]


def _fold_targets(b: Builder, dy: str) -> tuple[str, str]:
    """[N, T, C, h, w] -> [N*T, C, h, w], and the [N, T] head to unfold with."""
    return b.op("Reshape", dy, b.op("Concat", b.product(dy, 0, 2), b.dims(dy, 2), axis=0)), b.dims(dy, 0, 2)


def _unfold_targets(b: Builder, dx: str, head: str, x: str) -> str:
    """[N*T, C, H, W] -> [N, T, C, H, W], the gradient of forward tensor ``x``, with ``head`` = [N, T]."""
    return b.op("Reshape", dx, b.op("Concat", head, b.dims(x, 1), axis=0))


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
    if any(d != 1 for d in a.get("dilations", [1])):
        raise _unsupported(node, "dilations are not supported")
    spatial = shape[2:]
    pads = _explicit_pads(a, spatial, kernel, strides, [1] * nd)
    if kernel == [1] * nd and strides == [1] * nd and not any(pads):
        return [dy[0]]
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
    return [_unfold_targets(b, dx, head, x)]


def _explicit_pads(
    a: dict, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]
) -> list[int]:
    """Begin/end pads of a Conv/pool node, with auto_pad SAME_* / VALID made explicit."""
    nd = len(kernel)
    mode = a.get("auto_pad", "NOTSET")
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
        "ConvTranspose", folded, b.weight(weight), group=int(a.get("group", 1)), strides=strides, pads=pads,
        dilations=dilations, kernel_shape=kernel, output_padding=extra,
    )  # fmt: skip
    return [_unfold_targets(b, dx, head, x)]


# dX = expand(dY) / (H * W)
def GlobalAveragePool(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    plane = b.op("Cast", b.product(x, 2), to=b.elem_type(x))
    return [b.op("Div", b.op("Expand", dy[0], b.grad_shape(dy[0], x)), plane)]


def _reduce_back(b: Builder, node: onnx.NodeProto, dy: list[Grad], mean: bool) -> list[Grad]:
    a = attrs(node)
    x = node.input[0]
    rank = b.rank(x)
    if len(node.input) > 1 and node.input[1]:
        value = b.constant_value(node.input[1])
        if value is None:
            raise _unsupported(node, "axes must be a constant")
        axes = [int(v) for v in value.ravel()]
    else:
        axes = list(a.get("axes", []))
    if not axes and int(a.get("noop_with_empty_axes", 0)):
        return [dy[0]]
    axes = sorted(ax % rank for ax in axes) if axes else list(range(rank))
    if 0 in axes:
        raise _unsupported(node, "it reduces over the batch axis")
    g = dy[0] if int(a.get("keepdims", 1)) else b.unsqueeze(dy[0], [ax + 1 for ax in axes])
    expanded = b.op("Expand", g, b.grad_shape(dy[0], x))
    if not mean:
        return [expanded]
    count = b.op("ReduceProd", b.op("Gather", b.op("Shape", x), b.ints(axes)), keepdims=1)
    return [b.op("Div", expanded, b.op("Cast", count, to=b.elem_type(x)))]


# dX = expand(dY with the reduced axes kept) / (number of reduced elements)
def ReduceMean(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    return _reduce_back(b, node, dy, mean=True)


# dX = expand(dY with the reduced axes kept)
def ReduceSum(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    return _reduce_back(b, node, dy, mean=False)


# Inference batch norm is per-channel affine: dX = dY * scale / sqrt(var + eps)
def BatchNormalization(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    eps = float(attrs(node).get("epsilon", 1e-5))
    if int(attrs(node).get("training_mode", 0)):
        raise _unsupported(node, "training_mode=1 is not an inference graph")
    factor = b.op("Div", node.input[1], b.op("Sqrt", b.op("Add", node.input[4], b.scalar(eps, x))))
    factor = b.op("Reshape", factor, b.ints([-1] + [1] * (b.rank(x) - 2)))
    return [b.op("Mul", dy[0], factor)]


# -- elementwise ops ---------------------------------------------------------------------
def _gaxis(b: Builder, node: onnx.NodeProto, tensor: str, axis: int) -> int:
    """Forward ``axis`` of ``tensor`` as an axis of its gradient (which has the target axis at 1)."""
    axis %= b.rank(tensor)
    return axis + (axis > 0)


def _bcast(b: Builder, x: str, out: str) -> str:
    """Forward tensor ``x`` ready to broadcast against the gradient of ``out``."""
    return b.fwd(x) if b.rank(x) == b.rank(out) else x


def _unbroadcast(b: Builder, node: onnx.NodeProto, g: str, x: str, core: int = 0) -> str:
    """Sum the gradient ``g`` of the node's broadcast output back to the shape of its input ``x``
    (``core``: trailing axes that do not broadcast, 2 for MatMul)."""
    xs, ys = b.shape(x), b.shape(node.output[0])
    if xs is None or ys is None:
        raise _unsupported(node, f"broadcasting of {x!r} needs known ranks")
    padded = [1] * (len(ys) - len(xs)) + xs
    pairs = list(zip(padded, ys, strict=True))[: len(ys) - core]
    axes = [i + (i > 0) for i, (dx, dy) in enumerate(pairs) if dx == 1 and dy != 1]
    if 0 in axes or (len(xs) < len(ys) and padded[0] == 1 and ys[0] != 1):
        raise _unsupported(node, f"{x!r} is broadcast along the batch axis")
    summed = b.reduce("ReduceSum", g, axes, keepdims=1) if axes else g
    return summed if len(xs) == len(ys) and not axes else b.op("Reshape", summed, b.grad_shape(g, x))


def _elementwise(local: Callable[[Builder, onnx.NodeProto, str], str]) -> VJP:
    """A rule for ``y = f(x)``, given ``local(b, node, dy) = dy * f'(x)``."""

    def rule(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
        return [local(b, node, dy[0])]

    return rule


def _x(b: Builder, node: onnx.NodeProto) -> str:
    return b.fwd(node.input[0])


def _y(b: Builder, node: onnx.NodeProto) -> str:
    return b.fwd(node.output[0])


def _scalar(b: Builder, node: onnx.NodeProto, value: float = 1.0) -> str:
    """A scalar of the element type of ``node``'s first input."""
    return b.scalar(value, node.input[0])


# dX = dY * (X > 0 ? 1 : alpha)
LeakyRelu = _elementwise(
    lambda b, n, g: b.op(
        "Mul",
        g,
        b.op("Where", b.op("Greater", _x(b, n), _scalar(b, n, 0)), _scalar(b, n),
             _scalar(b, n, attrs(n).get("alpha", 0.01))),
    )
)
# dX = dY * Y * (1 - Y)
Sigmoid = _elementwise(lambda b, n, g: b.op("Mul", g, b.op("Mul", _y(b, n), b.op("Sub", _scalar(b, n), _y(b, n)))))


# y = clip(alpha * x + beta, 0, 1)  =>  dX = dY * alpha * (0 < alpha * x + beta < 1)
def _hard_sigmoid_slope(b: Builder, n: onnx.NodeProto, alpha: float, beta: float) -> str:
    z = b.op("Add", b.op("Mul", _x(b, n), _scalar(b, n, alpha)), _scalar(b, n, beta))
    inside = b.op("And", b.op("Greater", z, _scalar(b, n, 0)), b.op("Less", z, _scalar(b, n, 1)))
    return b.op("Where", inside, _scalar(b, n, alpha), _scalar(b, n, 0))


HardSigmoid = _elementwise(
    lambda b, n, g: b.op("Mul", g, _hard_sigmoid_slope(b, n, attrs(n).get("alpha", 0.2), attrs(n).get("beta", 0.5)))
)
# y = x * clip(x / 6 + 1/2, 0, 1)  =>  dX = dY * (0 if x < -3, 1 if x > 3, else x / 3 + 1/2)
HardSwish = _elementwise(
    lambda b, n, g: b.op(
        "Mul",
        g,
        b.op(
            "Where",
            b.op("Less", _x(b, n), _scalar(b, n, -3)),
            _scalar(b, n, 0),
            b.op(
                "Where",
                b.op("Greater", _x(b, n), _scalar(b, n, 3)),
                _scalar(b, n, 1),
                b.op("Add", b.op("Mul", _x(b, n), _scalar(b, n, 1 / 3)), _scalar(b, n, 0.5)),
            ),
        ),
    )
)
# dX = dY / (2 Y)
Sqrt = _elementwise(lambda b, n, g: b.op("Div", g, b.op("Mul", _y(b, n), _scalar(b, n, 2))))
# dX = dY * 2 / sqrt(pi) * exp(-X^2)
Erf = _elementwise(
    lambda b, n, g: b.op(
        "Mul", g,
        b.op("Mul", b.op("Exp", b.op("Neg", b.op("Mul", _x(b, n), _x(b, n)))), _scalar(b, n, 2 / np.sqrt(np.pi))),
    )
)
# dX = dY * sign(X) (0 at 0, as torch)
Abs = _elementwise(lambda b, n, g: b.op("Mul", g, b.op("Sign", _x(b, n))))
# dX = dY / X
Log = _elementwise(lambda b, n, g: b.op("Div", g, _x(b, n)))
# dX = -dY * Y^2
Reciprocal = _elementwise(lambda b, n, g: b.op("Mul", g, b.op("Neg", b.op("Mul", _y(b, n), _y(b, n)))))
# dX = dY * cos(X)
Sin = _elementwise(lambda b, n, g: b.op("Mul", g, b.op("Cos", _x(b, n))))
# dX = -dY * sin(X)
Cos = _elementwise(lambda b, n, g: b.op("Mul", g, b.op("Neg", b.op("Sin", _x(b, n)))))
# dX = dY * sigmoid(X)
Softplus = _elementwise(lambda b, n, g: b.op("Mul", g, b.op("Sigmoid", _x(b, n))))
# dX = dY / (1 + |X|)^2
Softsign = _elementwise(
    lambda b, n, g: b.op("Div", g, b.op("Pow", b.op("Add", _scalar(b, n), b.op("Abs", _x(b, n))), _scalar(b, n, 2)))
)


def _exponential_below(b: Builder, n: onnx.NodeProto, g: str, above: float, scale: float, rate: float) -> str:
    """dY * (X > 0 ? above : scale * exp(rate * X)), the derivative of the ELU family."""
    below = b.op("Mul", b.op("Exp", b.op("Mul", _x(b, n), _scalar(b, n, rate))), _scalar(b, n, scale))
    return b.op("Mul", g, b.op("Where", b.op("Greater", _x(b, n), _scalar(b, n, 0)), _scalar(b, n, above), below))


# dX = dY * (X > 0 ? 1 : alpha exp(X))
Elu = _elementwise(lambda b, n, g: _exponential_below(b, n, g, 1.0, attrs(n).get("alpha", 1.0), 1.0))
# dX = dY * (X > 0 ? gamma : gamma alpha exp(X)), with ONNX's default alpha and gamma
def _selu(b: Builder, n: onnx.NodeProto, g: str) -> str:
    gamma, alpha = attrs(n).get("gamma", 1.05070102214813232421875), attrs(n).get("alpha", 1.67326319217681884765625)
    return _exponential_below(b, n, g, gamma, gamma * alpha, 1.0)


Selu = _elementwise(_selu)
# dX = dY * (X > 0 ? 1 : exp(X / alpha))
Celu = _elementwise(lambda b, n, g: _exponential_below(b, n, g, 1.0, 1.0, 1 / attrs(n).get("alpha", 1.0)))
# dX = dY * (X > alpha ? 1 : 0)
ThresholdedRelu = _elementwise(
    lambda b, n, g: b.op("Where", b.op("Greater", _x(b, n), _scalar(b, n, attrs(n).get("alpha", 1.0))), g,
                         b.op("Mul", g, _scalar(b, n, 0))),
)


# X * tanh(softplus(X)): dX = dY * (t + X * sigmoid(X) * (1 - t^2)), t = tanh(softplus(X))
def _mish(b: Builder, n: onnx.NodeProto, g: str) -> str:
    x = _x(b, n)
    t = b.op("Tanh", b.op("Softplus", x))
    slope = b.op("Mul", b.op("Mul", x, b.op("Sigmoid", x)), b.op("Sub", _scalar(b, n), b.op("Mul", t, t)))
    return b.op("Mul", g, b.op("Add", t, slope))


Mish = _elementwise(_mish)
# dX = Cast(dY, to = X's type)
Cast = _elementwise(lambda b, n, g: b.op("Cast", g, to=b.elem_type(n.input[0])))
# dX = dY * (1 - Y^2)
Tanh = _elementwise(lambda b, n, g: b.op("Mul", g, b.op("Sub", _scalar(b, n), b.op("Mul", _y(b, n), _y(b, n)))))
# dX = dY * Y
Exp = _elementwise(lambda b, n, g: b.op("Mul", g, _y(b, n)))
# dX = -dY
Neg = _elementwise(lambda b, n, g: b.op("Neg", g))


# exact: dX = dY * (Phi(x) + x * phi(x));  tanh: derivative of 0.5 x (1 + tanh(k (x + 0.044715 x^3)))
def Gelu(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x, one, half = _x(b, node), _scalar(b, node), _scalar(b, node, 0.5)
    if attrs(node).get("approximate", "none") == "tanh":
        k = np.sqrt(2 / np.pi)
        x2 = b.op("Mul", x, x)
        inner = b.op(
            "Mul", b.op("Mul", x, _scalar(b, node, k)), b.op("Add", one, b.op("Mul", x2, _scalar(b, node, 0.044715)))
        )
        t = b.op("Tanh", inner)
        dinner = b.op("Mul", _scalar(b, node, k), b.op("Add", one, b.op("Mul", x2, _scalar(b, node, 3 * 0.044715))))
        sech2 = b.op("Sub", one, b.op("Mul", t, t))
        slope = b.op(
            "Add", b.op("Mul", half, b.op("Add", one, t)), b.op("Mul", b.op("Mul", half, x), b.op("Mul", sech2, dinner))
        )
    else:
        cdf = b.op("Mul", half, b.op("Add", one, b.op("Erf", b.op("Mul", x, _scalar(b, node, 1 / np.sqrt(2))))))
        pdf = b.op(
            "Mul",
            b.op("Exp", b.op("Mul", b.op("Mul", x, x), _scalar(b, node, -0.5))),
            _scalar(b, node, 1 / np.sqrt(2 * np.pi)),
        )
        slope = b.op("Add", cdf, b.op("Mul", x, pdf))
    return [b.op("Mul", dy[0], slope)]


# y = x ** p with constant p  =>  dX = dY * p * x ** (p - 1)
def Pow(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    p = b.constant_value(node.input[1])
    if p is None or p.size != 1:
        raise _unsupported(node, "only a constant scalar exponent is supported")
    p = float(p.ravel()[0])
    slope = b.op("Mul", b.op("Pow", _x(b, node), _scalar(b, node, p - 1)), _scalar(b, node, p))
    return [b.op("Mul", dy[0], slope)]


# -- binary ops with broadcasting: each input's gradient is summed back to its shape -------
def _binary(b: Builder, node: onnx.NodeProto, grads: list[str], inputs: object = None) -> list[Grad]:
    inputs = node.input if inputs is None else inputs
    return [_unbroadcast(b, node, g, x) if b.needs(x) else None for g, x in zip(grads, inputs, strict=True)]


# dA = dY, dB = dY
def Add(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    return _binary(b, node, [dy[0], dy[0]])


# dX_i = dY for every input
def Sum(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    return _binary(b, node, [dy[0]] * len(node.input))


# dA = dY, dB = -dY
def Sub(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    return _binary(b, node, [dy[0], b.op("Neg", dy[0])])


# dA = dY * B, dB = dY * A
def Mul(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a, c = node.input
    out = node.output[0]
    grads = [b.op("Mul", dy[0], _bcast(b, other, out)) if b.needs(x) else None for x, other in ((a, c), (c, a))]
    return _binary(b, node, grads)


# dA = dY / B, dB = -dY * Y / B
def Div(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    da = b.op("Div", dy[0], _bcast(b, node.input[1], node.output[0]))
    db = b.op("Neg", b.op("Mul", da, _y(b, node))) if b.needs(node.input[1]) else None
    return _binary(b, node, [da, db])


# -- ops that move data around ---------------------------------------------------------------
def _sizes(b: Builder, node: onnx.NodeProto, tensors: list[str], axis: int) -> list[int]:
    sizes = [(b.shape(t) or [None] * (axis + 1))[axis] for t in tensors]
    if any(s is None for s in sizes):
        raise _unsupported(node, f"needs static sizes along axis {axis}")
    return sizes


def _split(b: Builder, g: str, axis: int, sizes: list[int]) -> list[str]:
    if b.opset >= 13:
        return b.op_multi("Split", g, b.ints(sizes), outputs=len(sizes), axis=axis)
    return b.op_multi("Split", g, outputs=len(sizes), axis=axis, split=sizes)


# dX_i = the i-th slice of dY along the concat axis
def Concat(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    axis = int(attrs(node)["axis"]) % b.rank(node.output[0])
    return _split(b, dy[0], _gaxis(b, node, node.output[0], axis), _sizes(b, node, list(node.input), axis))


# dX = Concat(dY_i) along the split axis, zeros for outputs that get no gradient
def Split(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    axis = int(attrs(node).get("axis", 0)) % b.rank(x)
    parts = []
    for g, out in zip(dy, node.output, strict=True):
        if g is None:
            ref = next(d for d in dy if d is not None)
            shape = b.op("Concat", b.dims(out, 0, 1), b.dims(ref, 1, 2), b.dims(out, 1), axis=0)
            g = b.zeros(shape, like=x)
        parts.append(g)
    return [b.op("Concat", *parts, axis=_gaxis(b, node, x, axis))]


# dX = Transpose(dY, inverse permutation), the target axis staying at 1
def Transpose(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    rank = b.rank(node.input[0])
    inverse = np.argsort(list(attrs(node).get("perm", range(rank - 1, -1, -1))))
    axes = [int(a) + (a > 0) for a in inverse]  # forward axis of Y -> axis of dY
    return [b.op("Transpose", dy[0], perm=[axes[0], 1, *axes[1:]])]


def _constant_ints(b: Builder, node: onnx.NodeProto, index: int, attr: str) -> list[int] | None:
    if (b.opset >= 10 and attr != "pads") or (attr == "pads" and b.opset >= 11):
        if len(node.input) <= index or not node.input[index]:
            return None
        value = b.constant_value(node.input[index])
        if value is None:
            raise _unsupported(node, f"input {index} ({attr}) must be a constant")
        return [int(v) for v in value.ravel()]
    value = attrs(node).get(attr)
    return None if value is None else [int(v) for v in value]


# dX = dY padded back with zeros where the slice cut (steps of 1 only: other steps are refused)
def Slice(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    shape = b.shape(x)
    starts, ends = _constant_ints(b, node, 1, "starts"), _constant_ints(b, node, 2, "ends")
    axes = _constant_ints(b, node, 3, "axes") or list(range(len(starts)))
    steps = _constant_ints(b, node, 4, "steps") or [1] * len(starts)
    pads = [0] * 2 * (len(shape) + 1)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= len(shape)
        size = shape[axis]
        if size is None or step != 1:
            raise _unsupported(node, "needs a static size and step 1 on every sliced axis")
        begin, stop, _ = slice(start, end, step).indices(size)
        pads[_gaxis(b, node, x, axis)] = begin
        pads[_gaxis(b, node, x, axis) + len(shape) + 1] = size - max(stop, begin)
    padded = b.op("Pad", dy[0], b.ints(pads)) if b.opset >= 11 else b.op("Pad", dy[0], pads=pads)
    return [padded]


# constant-mode Pad: dX = the unpadded window of dY
def Pad(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    mode = attrs(node).get("mode", "constant")
    pads = _constant_ints(b, node, 1, "pads")
    rank = b.rank(x)
    if mode != "constant" or pads is None or any(p < 0 for p in pads):
        raise _unsupported(node, "only constant-mode padding with non-negative constant pads is supported")
    if len(node.input) > 3 and node.input[3]:
        axes = [a % rank for a in _constant_ints(b, node, 3, "axes")]
        full = [0] * 2 * rank
        for i, a in enumerate(axes):
            full[a], full[a + rank] = pads[i], pads[i + len(axes)]
        pads = full
    if pads[0] or pads[rank]:
        raise _unsupported(node, "it pads the batch axis")
    starts = [pads[a] for a in range(1, rank)]
    ends = [pads[a] + b.shape(x)[a] for a in range(1, rank)]
    axes = list(range(2, rank + 1))
    return [b.op("Slice", dy[0], b.ints(starts), b.ints(ends), b.ints(axes))]


# -- normalisations and softmax -----------------------------------------------------------------
# y = softmax(x)  =>  dX = Y * (dY - sum(dY * Y));   y = log_softmax(x)  =>  dX = dY - exp(Y) * sum(dY)
def _softmax_axes(b: Builder, node: onnx.NodeProto) -> list[int]:
    rank = b.rank(node.input[0])
    axis = int(attrs(node).get("axis", -1 if b.opset >= 13 else 1)) % rank
    forward = [axis] if b.opset >= 13 else list(range(axis, rank))  # before 13: coerced to 2-D at axis
    return [_gaxis(b, node, node.input[0], a) for a in forward]


def Softmax(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    y, axes = _y(b, node), _softmax_axes(b, node)
    inner = b.reduce("ReduceSum", b.op("Mul", dy[0], y), axes, keepdims=1)
    return [b.op("Mul", y, b.op("Sub", dy[0], inner))]


def LogSoftmax(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    y, axes = _y(b, node), _softmax_axes(b, node)
    total = b.reduce("ReduceSum", dy[0], axes, keepdims=1)
    return [b.op("Sub", dy[0], b.op("Mul", b.op("Exp", y), total))]


# y = xhat * gamma + beta, xhat = (x - mean) / sigma over axes [axis, rank)
# =>  dX = (g - mean(g) - xhat * mean(g * xhat)) / sigma, with g = dY * gamma
def LayerNormalization(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    rank = b.rank(x)
    a = attrs(node)
    axes = [_gaxis(b, node, x, i) for i in range(int(a.get("axis", -1)) % rank, rank)]
    xt = b.fwd(x)
    centred = b.op("Sub", xt, b.reduce("ReduceMean", xt, axes, keepdims=1))
    variance = b.reduce("ReduceMean", b.op("Mul", centred, centred), axes, keepdims=1)
    sigma = b.op("Sqrt", b.op("Add", variance, _scalar(b, node, float(a.get("epsilon", 1e-5)))))
    xhat = b.op("Div", centred, sigma)
    g = b.op("Mul", dy[0], node.input[1])
    mean_g = b.reduce("ReduceMean", g, axes, keepdims=1)
    mean_gx = b.reduce("ReduceMean", b.op("Mul", g, xhat), axes, keepdims=1)
    dx = b.op("Div", b.op("Sub", b.op("Sub", g, mean_g), b.op("Mul", xhat, mean_gx)), sigma)
    return [dx]


# y = Gather(x, I) with a 1-D x and indices computed at run time (torch's as_strided)
# =>  dX[j] = sum of dY[i] over the positions i with I[i] = j, scattered with reduction="add" in [T, ...] order
def _gather_1d_back(b: Builder, node: onnx.NodeProto, dy: str) -> str:
    x, y = node.input[0], node.output[0]
    if b.opset < 16:
        raise _unsupported(node, "indices computed at run time need opset 16 (ScatterElements with reduction)")
    front = _swap_front(b, dy, y)  # [T, I...]
    updates = b.op("Reshape", front, b.op("Concat", b.dims(front, 0, 1), b.product(front, 1), axis=0))
    indices = b.op("Expand", b.op("Reshape", node.input[1], b.ints([1, -1])), b.op("Shape", updates))
    zeros = b.zeros(b.op("Concat", b.dims(front, 0, 1), b.op("Shape", x), axis=0), like=x)
    return _swap_front(b, b.op("ScatterElements", zeros, indices, updates, axis=1, reduction="add"), x)


# y = Gather(x, I, axis) with constant I  =>  dX = dY contracted with one_hot(I) along the axis
# (along axis 0, in [T, ...] order, since the indices' axes then take the place of axis 0)
def Gather(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x, y = node.input[0], node.output[0]
    rank = b.rank(x)
    axis = int(attrs(node).get("axis", 0)) % rank
    indices = b.constant_value(node.input[1])
    size = (b.shape(x) or [None] * rank)[axis]
    if indices is None and rank == 1:
        return [_gather_1d_back(b, node, dy[0])]
    if indices is None or size is None:
        raise _unsupported(node, "needs constant indices (or a 1-D input) and a static size along the gathered axis")
    g = dy[0] if axis else _swap_front(b, dy[0], y)
    onehot = np.zeros((indices.size, size), dtype=b.np_dtype(x))
    np.add.at(onehot, (np.arange(indices.size), indices.ravel() % size), 1)
    # bring the gathered axes to the end, flatten them to one, multiply by the one-hot matrix
    g_rank, gaxis = b.rank(y) + 1, axis + 1
    moved = list(range(gaxis, gaxis + indices.ndim))
    perm = [i for i in range(g_rank) if i not in moved] + moved
    g = b.op("Transpose", g, perm=perm) if moved else b.unsqueeze(g, [g_rank])
    keep = b.op("Slice", b.op("Shape", g), b.ints([0]), b.ints([g_rank - len(moved)]))
    flat = b.op("Reshape", g, b.op("Concat", keep, b.product(g, g_rank - len(moved)), axis=0))
    scattered = b.op("MatMul", flat, b.const(onehot, "gather_onehot"))  # [..., size]
    dx = b.op("Transpose", scattered, perm=[*range(gaxis), rank, *range(gaxis, rank)])
    return [dx if axis else _swap_front(b, dx, x)]


RESIZE_COORDINATES = {  # x_resized -> x_original, given the scale and both lengths (ONNX Resize)
    "half_pixel": lambda o, scale, n_in, n_out: (o + 0.5) / scale - 0.5,
    "pytorch_half_pixel": lambda o, scale, n_in, n_out: (o + 0.5) / scale - 0.5 if n_out > 1 else 0 * o,
    "align_corners": lambda o, scale, n_in, n_out: o * (n_in - 1) / max(n_out - 1, 1),
    "asymmetric": lambda o, scale, n_in, n_out: o / scale,
}
NEAREST = {
    "round_prefer_floor": lambda x: np.where(x - np.floor(x) == 0.5, np.floor(x), np.round(x)),
    "round_prefer_ceil": lambda x: np.where(x - np.floor(x) == 0.5, np.ceil(x), np.round(x)),
    "floor": np.floor,
    "ceil": np.ceil,
}


def _resize_matrix(a: dict, scale: float, n_in: int, n_out: int) -> np.ndarray:
    """R [n_out, n_in] with y = R x along one axis, for Resize's linear or nearest mode."""
    x = RESIZE_COORDINATES[a.get("coordinate_transformation_mode", "half_pixel")](
        np.arange(n_out, dtype=np.float64), scale, n_in, n_out
    )
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if a.get("mode", "nearest") == "nearest":
        picked = NEAREST[a.get("nearest_mode", "round_prefer_floor")](x)
        matrix[rows, np.clip(picked, 0, n_in - 1).astype(int)] = 1
        return matrix
    x = np.clip(x, 0, n_in - 1)
    low = np.floor(x).astype(int)
    high, frac = np.minimum(low + 1, n_in - 1), x - low
    np.add.at(matrix, (rows, low), 1 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


# y = R_h X R_w^T over (h, w) for a separable linear or nearest Resize  =>  dX = R_h^T dY R_w
def Resize(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x, a = node.input[0], attrs(node)
    shape_in, shape_out = b.shape(x), b.shape(node.output[0])
    scales = b.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    supported = (
        b.opset >= 11 and shape_in is not None and shape_out is not None and len(shape_in) == len(shape_out) == 4
        and all(isinstance(d, int) for d in [*shape_in[1:], *shape_out[1:]]) and shape_in[1] == shape_out[1]
        and a.get("mode", "nearest") in ("nearest", "linear") and not a.get("antialias", 0) and "axes" not in a
        and a.get("coordinate_transformation_mode", "half_pixel") in RESIZE_COORDINATES
        and a.get("nearest_mode", "round_prefer_floor") in NEAREST
    )  # fmt: skip
    if not supported:
        raise _unsupported(node, "only 4-D nearest or linear resizing of static h, w (half_pixel, pytorch_half_pixel, "
                                 "align_corners or asymmetric coordinates, no antialias) is supported")  # fmt: skip
    factors = [float(v) for v in scales[2:]] if scales is not None and scales.size == 4 else [
        o / i for i, o in zip(shape_in[2:], shape_out[2:], strict=True)]  # fmt: skip
    r_h, r_w = (_resize_matrix(a, f, i, o) for f, i, o in zip(factors, shape_in[2:], shape_out[2:], strict=True))
    dtype = b.np_dtype(x)
    rows = b.op("MatMul", dy[0], b.const(r_w.astype(dtype), "resize_w"))  # [N, T, C, H_out, w_in]
    return [b.op("MatMul", b.const(r_h.T.astype(dtype), "resize_h_t"), rows)]


# y = broadcast(X, shape)  =>  dX = dY summed over the broadcast axes
def Expand(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    return [_unbroadcast(b, node, dy[0], node.input[0])]


# y = where(C, A, B)  =>  dA = where(C, dY, 0), dB = where(C, 0, dY), each summed back to its shape
def Where(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    condition, y = _bcast(b, node.input[0], node.output[0]), node.output[0]
    zero = b.scalar(0.0, y)
    picked = [b.op("Where", condition, dy[0], zero), b.op("Where", condition, zero, dy[0])]
    return [None, *_binary(b, node, picked, node.input[1:])]


# -- quantization: straight-through, so that DequantizeLinear(QuantizeLinear(x)) passes dY where x was in range ----
QUANT_RANGES = {
    onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.UINT4: (0, 15), onnx.TensorProto.INT4: (-8, 7),
}  # fmt: skip


def _quant_param(b: Builder, node: onnx.NodeProto, index: int, x: str) -> str | None:
    """Input ``index`` of a Q/DQ node (scale or zero point) shaped to broadcast against the gradient of ``x``."""
    if len(node.input) <= index or not node.input[index]:
        return None
    a = attrs(node)
    if int(a.get("block_size", 0)):
        raise _unsupported(node, "blocked quantization (block_size) is not supported")
    param = node.input[index]
    if b.rank(param) == 0 or (b.shape(param) or [0])[0] == 1:
        return param
    axis = int(a.get("axis", 1)) % b.rank(x)
    if axis == 0:
        raise _unsupported(node, "a per-axis scale along the batch axis is not supported")
    return b.op("Reshape", param, b.ints([-1] + [1] * (b.rank(x) - 1 - axis)))


def _as_float(b: Builder, x: str, like: str) -> str:
    return b.op("Cast", x, to=b.elem_type(like))


# Y = saturate(round(X / s) + z)  =>  dX = dY / s where qmin <= round(X / s) + z <= qmax, else 0 (straight-through)
def QuantizeLinear(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x, y = node.input[0], node.output[0]
    bounds = QUANT_RANGES.get(b.elem_type(y))
    if bounds is None:
        raise _unsupported(node, "only integer outputs (int4 to int16) are supported")
    scale = _quant_param(b, node, 1, x)
    level = b.op("Round", b.op("Div", b.fwd(x), scale))
    zero = _quant_param(b, node, 2, x)
    level = level if zero is None else b.op("Add", level, _as_float(b, zero, x))
    low, high = (b.scalar(float(v), x) for v in bounds)
    outside = b.op("Or", b.op("Less", level, low), b.op("Greater", level, high))  # (no GreaterOrEqual before opset 12)
    inside = b.op("Not", outside)
    return [_mask(b, b.op("Div", dy[0], scale), inside, x)]


# Y = (X - z) * s  =>  dX = dY * s   (X: integer levels, their gradient a float tensor)
def DequantizeLinear(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    return [b.op("Mul", dy[0], _quant_param(b, node, 1, x))] if b.needs(x) else []


RULES: dict[str, Rule] = {op: Rule(vjp) for op, vjp in {
    "Identity": Identity, "Dropout": Dropout, "Relu": Relu, "LeakyRelu": LeakyRelu, "Clip": Clip,
    "Sigmoid": Sigmoid, "HardSigmoid": HardSigmoid, "HardSwish": HardSwish, "Sqrt": Sqrt, "Erf": Erf,
    "Gelu": Gelu, "Tanh": Tanh, "Exp": Exp, "Neg": Neg, "Pow": Pow, "Cast": Cast, "Add": Add, "Sum": Sum,
    "Sub": Sub, "Mul": Mul, "Div": Div, "Where": Where, "Flatten": Flatten, "Reshape": Reshape,
    "Squeeze": Squeeze, "Unsqueeze": Unsqueeze, "Expand": Expand, "Transpose": Transpose, "Concat": Concat,
    "Split": Split, "Slice": Slice, "Pad": Pad, "Gather": Gather, "Gemm": Gemm, "MatMul": MatMul, "Conv": Conv,
    "Resize": Resize, "AveragePool": AveragePool, "GlobalAveragePool": GlobalAveragePool, "ReduceMean": ReduceMean,
    "ReduceSum": ReduceSum,
    "BatchNormalization": BatchNormalization, "LayerNormalization": LayerNormalization,
    "Softmax": Softmax, "LogSoftmax": LogSoftmax,
    "DequantizeLinear": DequantizeLinear,
    "Abs": Abs, "Log": Log, "Reciprocal": Reciprocal, "Sin": Sin, "Cos": Cos, "Softplus": Softplus,
    "Softsign": Softsign, "Elu": Elu, "Selu": Selu, "Celu": Celu, "ThresholdedRelu": ThresholdedRelu, "Mish": Mish,
}.items()} | {
    "MaxPool": Rule(MaxPool, extra_outputs=("indices",)),
    "QuantizeLinear": Rule(QuantizeLinear, levels=True),
}  # fmt: skip
