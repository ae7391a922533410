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
    other integer tensors (shapes, indices) carry none. ``opset``: the default-domain opset its backward ops need
    (ScatterElements and ScatterND with ``reduction="add"``: 16), to which ``export --from`` raises a model.
    """

    vjp: VJP
    extra_outputs: tuple[str, ...] = ()
    levels: bool = False
    opset: int = 0


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
    return b.op("Mul", dy, b.op("Cast", keep, to=b.elem_type(like)))  # (ONNX Runtime's Mul: 2x its Where)


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


# dX = dY * (min < X < max)   (strict, as torch's hardtanh/relu6 backward), read on Y: min < Y < max holds where
# min < X < max does, and the forward's Conv then stays fused with its Clip (ONNX Runtime fuses an activation
# into a Conv whose output has no other reader)
def Clip(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    y = node.output[0]
    a = attrs(node)
    bounds = [node.input[i] if len(node.input) > i and node.input[i] else None for i in (1, 2)]
    if b.opset < 11:
        bounds = [
            b.scalar(float(a.get("min", -np.inf)), y) if "min" in a else None,
            b.scalar(float(a.get("max", np.inf)), y) if "max" in a else None,
        ]
    keep = None
    for bound, cmp in zip(bounds, ("Greater", "Less"), strict=True):
        if bound is not None:
            inside = b.op(cmp, b.fwd(y), bound)
            keep = inside if keep is None else b.op("And", keep, inside)
    return [dy[0] if keep is None else _mask(b, dy[0], keep, y)]


# Guided Backpropagation (Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR workshop
# 2015): the ReLU family's backward passes only positive gradients where its input was positive,
# dX = ReLU(dY) * (Y > 0); a Clip from 0 (ReLU6) likewise inside its bounds. Other ops keep their rules.
def GuidedRelu(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    return Relu(b, node, [b.op("Relu", dy[0])])


def GuidedClip(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    if b.opset < 11:
        lower = attrs(node).get("min")
    else:
        found = b.constant_value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        lower = None if found is None else float(np.asarray(found).reshape(-1)[0])
    return Clip(b, node, [b.op("Relu", dy[0])] if lower == 0 else dy)


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

    def transposed(t: str) -> str:  # a forward operand, its last two axes swapped; a weight has no batch axis (nor
        # what is computed from weights alone: a Transpose of one that no exporter folded)
        batched = b.rank(t) == b.rank(out) and b.constant_value(t) is None and t not in b.static
        return _transpose_last(b, b.fwd(t) if batched else b.weight(t), b.rank(t) + batched)

    da = b.op("MatMul", dy[0], transposed(c)) if b.needs(a) else None
    dc = b.op("MatMul", transposed(a), dy[0]) if b.needs(c) else None
    return [None if g is None else _unbroadcast(b, node, g, x, core=2) for g, x in ((da, a), (dc, c))]


def _einsum_terms(b: Builder, node: onnx.NodeProto) -> tuple[list[str], str, Callable[[], str]]:
    """The operands' and the output's subscripts of an Einsum node, ellipses spelled out as letters, the
    implicit output made explicit; and a source of letters the equation does not use."""
    equation = attrs(node)["equation"].replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    unused = iter(sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") - set(equation)))
    spans = [b.rank(x) - (len(t) - 3) for t, x in zip(terms, node.input, strict=True) if "..." in t]
    ellipsis = "".join(next(unused) for _ in range(max(spans, default=0)))
    terms = [t.replace("...", ellipsis[len(ellipsis) - (b.rank(x) - len(t) + 3):] if "..." in t else "")
             for t, x in zip(terms, node.input, strict=True)]  # fmt: skip
    if not arrow:
        once = sorted(c for c in set("".join(terms)) if "".join(terms).count(c) == 1 and c not in ellipsis)
        rhs = ellipsis + "".join(once)
    rhs = rhs.replace("...", ellipsis)
    if any(len(set(t)) != len(t) for t in [*terms, rhs]):
        raise _unsupported(node, "a subscript repeated within one operand (a diagonal) is not supported")
    sizes: dict[str, set] = {}
    for term, x in zip(terms, node.input, strict=True):
        for c, d in zip(term, b.shape(x), strict=True):
            sizes.setdefault(c, set()).add(d)
    if any(1 in found and len(found) > 1 for found in sizes.values()):
        raise _unsupported(node, "operands broadcast against each other (a size-1 axis) is not supported")
    return terms, rhs, lambda: next(unused)


# y = einsum(X_1, ..., X_n)  =>  dX_i = einsum(dY, X_j for j != i) onto X_i's subscripts, the target axis beside
# the batch's (which leads the output and X_i), the subscripts only X_i holds (summed in the forward) expanded
def Einsum(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    terms, rhs, letter = _einsum_terms(b, node)
    target = letter()
    grads: list[Grad] = []
    for i, (term, x) in enumerate(zip(terms, node.input, strict=True)):
        if not b.needs(x):
            grads.append(None)
            continue
        if not rhs or term[0] != rhs[0]:
            raise _unsupported(node, "a differentiable operand must lead with the output's batch subscript")
        others = [(t, inp) for j, (t, inp) in enumerate(zip(terms, node.input, strict=True)) if j != i]
        reach = set(rhs).union(*[set(t) for t, _ in others])
        kept = "".join(c for c in term if c in reach)
        equation = ",".join([rhs[0] + target + rhs[1:], *[t for t, _ in others]]) + f"->{kept[0]}{target}{kept[1:]}"
        g = b.op("Einsum", dy[0], *[b.weight(inp) for _, inp in others], equation=equation)
        if kept != term:
            g = b.op("Expand", b.unsqueeze(g, [p + 1 for p, c in enumerate(term) if c not in reach]),
                     b.grad_shape(dy[0], x))  # fmt: skip
        grads.append(g)
    return grads


# Y[n, c, o] = sum over the corners k of w_k(grid[n, o]) X[n, c, corner_k]: bilinear (4 corners) or nearest (1),
# corners outside the input count 0 (zeros padding) or the coordinate is clamped to the edge first (border); the
# pixel coordinate is ix = ((x + 1) W - 1) / 2, or (x + 1) (W - 1) / 2 with align_corners, likewise iy
# =>  dX = dY added to each corner with its weight;  dgrid_x = sum_c dY sum_k X_k dw_k/dix dix/dx (likewise y;
# 0 where border padding clamped the coordinate, and for nearest sampling)
def GridSample(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a = attrs(node)
    x, grid = node.input[0], node.input[1]
    shape = b.shape(x)
    mode, padding = a.get("mode", "linear" if b.opset >= 20 else "bilinear"), a.get("padding_mode", "zeros")
    supported = shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[1:])
    if not supported or mode not in ("bilinear", "linear", "nearest") or padding not in ("zeros", "border"):
        raise _unsupported(node, "only 4-D bilinear or nearest sampling of a static input with zeros or border "
                                 "padding is supported")  # fmt: skip
    height, width = shape[2:]
    flat_grid = b.op("Cast", b.op("Reshape", grid, b.op("Concat", b.dims(grid, 0, 1), [-1, 2], axis=0)),
                     to=b.elem_type(x))  # [N, P, 2]  # fmt: skip

    def pixel(axis: int, size: int) -> tuple[str, str | None, float]:
        """The pixel coordinate [N, 1, P] along one axis, where border padding left it unclamped, d pixel / d grid."""
        c = b.unsqueeze(b.op("Gather", flat_grid, axis, axis=2), [1])
        slope = (size - 1) / 2 if int(a.get("align_corners", 0)) else size / 2
        p = b.op("Add", b.op("Mul", c, slope), (size - 1) / 2)
        if padding != "border":
            return p, None, slope
        free = b.op("Cast", b.op("And", b.op("Greater", p, 0.0), b.op("Less", p, float(size - 1))), to=b.elem_type(x))
        return b.op("Clip", p, b.scalar(0.0, x), b.scalar(float(size - 1), x)), free, slope

    def cell(cx: str, cy: str) -> tuple[str, str]:
        """A corner's flat index [N, 1, P] (clamped into the input) and 1 where it lies inside, else 0."""
        inside = b.op("And", b.op("And", b.op("GreaterOrEqual", cx, 0.0), b.op("LessOrEqual", cx, float(width - 1))),
                      b.op("And", b.op("GreaterOrEqual", cy, 0.0), b.op("LessOrEqual", cy, float(height - 1))))
        clamped = [b.op("Clip", c, b.scalar(0.0, x), b.scalar(float(n - 1), x)) for c, n in ((cx, width), (cy, height))]
        flat = b.op("Add", b.op("Mul", clamped[1], float(width)), clamped[0])
        return b.op("Cast", flat, to=onnx.TensorProto.INT64), b.op("Cast", inside, to=b.elem_type(x))

    (px, free_x, slope_x), (py, free_y, slope_y) = pixel(0, width), pixel(1, height)
    if mode == "nearest":  # (half to even, as ONNX Runtime and torch's nearbyint)
        flat, inside = cell(b.op("Round", px), b.op("Round", py))
        taps = [(flat, inside, None, None)]  # (flat index, weight, d weight / d px, d weight / d py)
    else:
        x0, y0 = b.op("Floor", px), b.op("Floor", py)
        fx, fy = b.op("Sub", px, x0), b.op("Sub", py, y0)
        gx, gy = b.op("Sub", 1.0, fx), b.op("Sub", 1.0, fy)
        x1, y1 = b.op("Add", x0, 1.0), b.op("Add", y0, 1.0)
        taps = []
        for cx, cy, wx, wy, sign_x, sign_y in ((x0, y0, gx, gy, -1.0, -1.0), (x1, y0, fx, gy, 1.0, -1.0),
                                               (x0, y1, gx, fy, -1.0, 1.0), (x1, y1, fx, fy, 1.0, 1.0)):  # fmt: skip
            flat, inside = cell(cx, cy)
            weight = b.op("Mul", b.op("Mul", wx, wy), inside)
            taps.append((flat, weight, b.op("Mul", b.op("Mul", wy, sign_x), inside),
                         b.op("Mul", b.op("Mul", wx, sign_y), inside)))  # fmt: skip
    folded = b.op("Reshape", dy[0], b.op("Concat", b.dims(dy[0], 0, 3), b.product(dy[0], 3), axis=0))  # [N,T,C,P]
    dx = dgrid = None
    if b.needs(x):
        updates = b.op("Concat", *[b.op("Mul", folded, b.unsqueeze(w, [1])) for _, w, _, _ in taps], axis=3)
        at = b.op("Expand", b.unsqueeze(b.op("Concat", *[t[0] for t in taps], axis=2), [1]), b.op("Shape", updates))
        zeros = b.zeros(b.op("Concat", b.dims(folded, 0, 3), [height * width], axis=0), like=x)
        dx = b.op("Reshape", b.op("ScatterElements", zeros, at, updates, axis=3, reduction="add"),
                  b.grad_shape(dy[0], x))  # fmt: skip
    if b.needs(grid) and mode == "nearest":
        dgrid = b.zeros(b.grad_shape(dy[0], grid), like=grid)
    elif b.needs(grid):
        values = b.op("Reshape", x, b.op("Concat", b.dims(x, 0, 2), [height * width], axis=0))  # [N, C, H*W]
        corner = [b.op("GatherElements", values, b.op("Expand", flat, b.op("Concat", b.dims(values, 0, 2),
                  b.dims(flat, 2), axis=0)), axis=2) for flat, _, _, _ in taps]  # [N, C, P] each  # fmt: skip
        parts = []
        for slope, free, pick in ((slope_x, free_x, 2), (slope_y, free_y, 3)):
            rate = b.op("Sum", *[b.op("Mul", v, t[pick]) for v, t in zip(corner, taps, strict=True)])
            rate = b.op("Mul", rate, slope if free is None else b.op("Mul", free, slope))
            parts.append(b.reduce("ReduceSum", b.op("Mul", folded, b.unsqueeze(rate, [1])), [2], keepdims=1))
        stacked = b.op("Transpose", b.op("Concat", *parts, axis=2), perm=[0, 1, 3, 2])  # [N, T, P, 2]
        dgrid = b.op("Cast", b.op("Reshape", stacked, b.grad_shape(dy[0], grid)), to=b.elem_type(grid))
    return [dx, dgrid]


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


def _fold_targets(b: Builder, dy: str, y: str | None = None) -> tuple[str, str]:
    """[N, T, C, h, w] -> [N*T, C, h, w], and the [N, T] head to unfold with. ``y``: the forward tensor ``dy``
    is the gradient of; where its ``[C, h, w]`` is static the target shape is a constant (``-1`` resolves on an
    empty batch too when no other size is 0): 6 small shape ops fewer per Conv (2 more in :func:`_unfold_targets`),
    where a backward runs 44 of them (EfficientNet-Lite0)."""
    trailing = _static_trailing(b, y)
    shape = b.ints([-1, *trailing]) if trailing else b.op("Concat", b.product(dy, 0, 2), b.dims(dy, 2), axis=0)
    return b.op("Reshape", dy, shape), b.dims(dy, 0, 2)


def _unfold_targets(b: Builder, dx: str, head: str, x: str) -> str:
    """[N*T, C, H, W] -> [N, T, C, H, W], the gradient of forward tensor ``x``, with ``head`` = [N, T]."""
    trailing = _static_trailing(b, x)
    return b.op("Reshape", dx, b.op("Concat", head, b.ints(trailing) if trailing else b.dims(x, 1), axis=0))


def _static_trailing(b: Builder, x: str | None) -> list[int] | None:
    """``x.shape[1:]`` where every size is known and above 0, else None."""
    shape = None if x is None else b.shape(x)
    if shape is None or len(shape) < 2 or any(d is None or d <= 0 for d in shape[1:]):
        return None
    return [int(d) for d in shape[1:]]


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


def _pool_geometry(b: Builder, node: onnx.NodeProto) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """A pool node's kernel, strides, begin/end pads, input and output spatial sizes (static)."""
    a = attrs(node)
    x = node.input[0]
    shape, out = b.shape(x), b.shape(node.output[0])
    if shape is None or out is None or any(d is None for d in shape[1:] + out[2:]):
        raise _unsupported(node, "needs static channel and spatial sizes (export with a fixed input size)")
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    strides = list(a.get("strides", [1] * nd))
    if any(d != 1 for d in a.get("dilations", [1])):
        raise _unsupported(node, "dilations are not supported")
    return kernel, strides, _explicit_pads(a, shape[2:], kernel, strides, [1] * nd), shape[2:], out[2:]


def _window_sum_back(b: Builder, node: onnx.NodeProto, g: str) -> str:
    """dX[i] = the sum of ``g`` over the windows of the pool ``node`` that hold input cell i: the transpose of a
    sum pool, a ConvTranspose with a kernel of ones, one filter per channel. Windows past the padded input
    (``ceil_mode``) and kernels larger than the input are as the ONNX spec defines them: the cells outside the
    input get nothing, so the kernel is cut to the cells that can land inside, and the result to the input."""
    x = node.input[0]
    kernel, strides, pads, spatial, out = _pool_geometry(b, node)
    nd = len(kernel)
    cut = [min(k, n + p) for k, n, p in zip(kernel, spatial, pads, strict=False)]
    if cut == [1] * nd and strides == [1] * nd and not any(pads) and out == spatial:
        return g
    folded, head = _fold_targets(b, g, node.output[0])
    ones = b.const(np.ones([b.shape(x)[1], 1, *cut], dtype=b.np_dtype(x)), "pool_ones")
    dx = b.op("ConvTranspose", folded, ones, group=b.shape(x)[1], strides=strides, pads=pads[:nd] + [0] * nd,
              kernel_shape=cut)  # fmt: skip
    reach = [(o - 1) * s + k - p for o, s, k, p in zip(out, strides, cut, pads, strict=False)]  # length of dx
    if any(r > n for r, n in zip(reach, spatial, strict=True)):
        dx = b.op("Slice", dx, [0] * nd, spatial, list(range(2, 2 + nd)))
    if any(r < n for r, n in zip(reach, spatial, strict=True)):
        dx = b.op("Pad", dx, [0] * (2 + nd) + [0, 0] + [max(n - r, 0) for r, n in zip(reach, spatial, strict=True)])
    return _unfold_targets(b, dx, head, x)


# y[o] = mean of x over window o  =>  dX = window_sum_back(dY / count), count[o] = the cells window o averaged:
# those inside the input, or (count_include_pad) inside the padded input
def AveragePool(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    kernel, strides, pads, spatial, out = _pool_geometry(b, node)
    nd = len(kernel)
    padded = int(attrs(node).get("count_include_pad", 0))
    counts = np.ones(out, dtype=np.float64)
    for axis in range(nd):
        starts = np.arange(out[axis]) * strides[axis] - pads[axis]
        low, high = (-pads[axis], spatial[axis] + pads[axis + nd]) if padded else (0, spatial[axis])
        count = np.minimum(starts + kernel[axis], high) - np.maximum(starts, low)
        counts = counts * count.reshape([-1 if i == axis else 1 for i in range(nd)])
    scaled = dy[0] if np.all(counts == 1) else b.op("Div", dy[0], counts.astype(b.np_dtype(node.input[0])))
    return [_window_sum_back(b, node, scaled)]


# y[o] = (sum over window o of |x|^p)^(1/p)  =>  dX = window_sum_back(dY / Y^(p-1)) * |X|^(p-1) * sign(X)
def LpPool(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    p = float(attrs(node).get("p", 2))
    x, y = _x(b, node), _y(b, node)
    if p == 1:
        return [b.op("Mul", _window_sum_back(b, node, dy[0]), b.op("Sign", x))]
    back = _window_sum_back(b, node, b.op("Div", dy[0], y if p == 2 else b.op("Pow", y, p - 1)))
    return [b.op("Mul", back, x if p == 2 else b.op("Mul", b.op("Pow", b.op("Abs", x), p - 1), b.op("Sign", x)))]


def _conv_shapes(b: Builder, node: onnx.NodeProto) -> tuple[list[int], list[int]]:
    """The static shapes of a Conv's or ConvTranspose's input and weight."""
    shape, w_shape = b.shape(node.input[0]), b.shape(node.input[1])
    if shape is None or w_shape is None or any(d is None for d in shape[1:] + w_shape):
        raise _unsupported(node, "needs static input and weight shapes (export with a fixed input size)")
    return shape, w_shape


# dX = ConvTranspose(dY, W) with the forward strides, pads, dilations and groups;
# output_padding restores input cells that no window reached.
def Conv(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a = attrs(node)
    x, weight = node.input[0], node.input[1]
    shape, w_shape = _conv_shapes(b, node)
    kernel = list(a.get("kernel_shape", w_shape[2:]))
    nd = len(kernel)
    strides, dilations = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    pads = _explicit_pads(a, shape[2:], kernel, strides, dilations)
    out = b.shape(node.output[0])[2:]
    reach = [(out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - pads[i] - pads[i + nd] for i in range(nd)]
    extra = [shape[2 + i] - reach[i] for i in range(nd)]
    folded, head = _fold_targets(b, dy[0], node.output[0])
    group = int(a.get("group", 1))
    reverse = [p for _ in range(2) for p in ((k - 1) * d for k, d in zip(kernel, dilations, strict=True))]
    reverse = [r - p for r, p in zip(reverse, pads, strict=True)]
    flipped = _flipped(b, weight, group) if set(strides) == {1} and min(reverse) >= 0 else None
    if flipped is not None:  # stride 1: the transpose is a Conv of dY with the kernel flipped, its channels swapped
        dx = b.op("Conv", folded, flipped, group=group, pads=reverse, dilations=dilations, kernel_shape=kernel)
    else:
        dx = b.op("ConvTranspose", folded, b.weight(weight), group=group, strides=strides, pads=pads,
                  dilations=dilations, kernel_shape=kernel, output_padding=extra)  # fmt: skip
    return [_unfold_targets(b, dx, head, x)]


def _flipped(b: Builder, weight: str, group: int) -> str | None:
    """A constant Conv weight ``W [M, C / g, k...]`` as the weight of the Conv that is its stride-1 transpose,
    ``W' [C, M / g, k...]``: each group's channels swapped, the kernel flipped (None: not a constant). ONNX
    Runtime's Conv kernels beat its ConvTranspose: 1.3-1.6x on VGG16's layers, 5-8x depthwise (Lite0's)."""
    key = f"{weight}/flipped"
    if key not in b.derived:
        value = b.constant_value(weight)
        if value is None:
            return None
        out, inner, kernel = value.shape[0], value.shape[1], value.shape[2:]
        swapped = value.reshape(group, out // group, inner, *kernel).swapaxes(1, 2).reshape(group * inner,
                                                                                           out // group, *kernel)
        b.derived[key] = b.const(np.ascontiguousarray(swapped[(..., *[slice(None, None, -1)] * len(kernel))]),
                                 "flipped_weight")  # fmt: skip
    return b.derived[key]


# y = ConvTranspose(X, W): the transpose of a Conv  =>  dX = Conv(dY, W) with the same strides, pads, dilations
# and groups (W [C_in, C_out / g, k...] read as a Conv weight [M = C_in, C / g = C_out / g, k...]); the cells
# output_padding added at the end reach no input
def ConvTranspose(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a = attrs(node)
    x, weight = node.input[0], node.input[1]
    shape, w_shape = _conv_shapes(b, node)
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "") or "output_shape" in a:
        raise _unsupported(node, "auto_pad and output_shape are not supported (explicit pads are)")
    kernel = list(a.get("kernel_shape", w_shape[2:]))
    nd = len(kernel)
    folded, head = _fold_targets(b, dy[0], node.output[0])
    dx = b.op(
        "Conv", folded, b.weight(weight), group=int(a.get("group", 1)), strides=list(a.get("strides", [1] * nd)),
        pads=list(a.get("pads", [0] * 2 * nd)), dilations=list(a.get("dilations", [1] * nd)), kernel_shape=kernel,
    )  # fmt: skip
    strides, padding = list(a.get("strides", [1] * nd)), list(a.get("output_padding", [0] * nd))
    if any(p >= s for p, s in zip(padding, strides, strict=True)):  # the Conv reads rows past the input's
        dx = b.op("Slice", dx, [0] * nd, shape[2:], list(range(2, 2 + nd)))
    return [_unfold_targets(b, dx, head, x)]


# dX = expand(dY) / (H * W)
def GlobalAveragePool(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    plane = b.op("Cast", b.product(x, 2), to=b.elem_type(x))
    return [b.op("Div", b.op("Expand", dy[0], b.grad_shape(dy[0], x)), plane)]


def _reduced_axes(b: Builder, node: onnx.NodeProto) -> list[int] | None:
    """The forward axes a Reduce* node reduces, sorted and non-negative; None for a no-op (empty axes with
    noop_with_empty_axes)."""
    x = node.input[0]
    rank = b.rank(x)
    if len(node.input) > 1 and node.input[1]:
        value = b.constant_value(node.input[1])
        if value is None:
            raise _unsupported(node, "axes must be a constant")
        axes = [int(v) for v in value.ravel()]
    else:
        axes = list(attrs(node).get("axes", []))
    if not axes and int(attrs(node).get("noop_with_empty_axes", 0)):
        return None
    axes = sorted(ax % rank for ax in axes) if axes else list(range(rank))
    if 0 in axes and (b.maybe_batch(x) or len(axes) == rank):
        raise _unsupported(node, "it reduces over the batch axis")
    return axes


Local = Callable[[Builder, str, str, list[int]], str | None]  # (fwd x, fwd y with kept axes, gradient axes)


def _reduction(local: Local | None, identity: bool = True) -> VJP:
    """The rule of ``y = reduce(x)`` over some axes: dX = expand(dY) * local(x, y), ``local`` the derivative of
    y by each element (None: 1), read on forward tensors with the target axis and the reduced axes kept.
    ``identity``: a no-op reduction passes dY as it is (else its form is refused)."""

    def rule(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
        x = node.input[0]
        axes = _reduced_axes(b, node)
        if axes is None:
            if not identity:
                raise _unsupported(node, "noop_with_empty_axes with empty axes is not supported")
            return [dy[0]]
        kept = int(attrs(node).get("keepdims", 1))
        g = dy[0]
        if not kept and axes[0] == 0:  # (a token axis first: dY [y0, T, ..] -> [1, T, y0, ..])
            g = b.unsqueeze(b.op("Transpose", g, perm=[1, 0, *range(2, b.rank(node.output[0]) + 1)]), [0])
        g = g if kept else b.unsqueeze(g, [ax + 1 for ax in axes if ax > 0])
        shape = (b.grad_shape(dy[0], x) if axes[0] else
                 b.op("Concat", b.dims(x, 0, 1), b.dims(dy[0], 1, 2), b.dims(x, 1), axis=0))  # fmt: skip
        expanded = b.op("Expand", g, shape)
        if local is None:
            return [expanded]
        y = node.output[0] if kept else b.unsqueeze(node.output[0], axes)
        return [b.op("Mul", expanded, local(b, b.fwd(x), b.fwd(y), [ax + (ax > 0) for ax in axes]))]

    return rule


def _count(b: Builder, x: str, axes: list[int]) -> str:
    """The number of elements of ``x`` over ``axes``, as a scalar of its element type."""
    return b.op("Cast", b.op("ReduceProd", b.op("Gather", b.op("Shape", x), axes), keepdims=1), to=b.elem_type(x))


def _extreme(b: Builder, x: str, y: str, axes: list[int]) -> str:
    """(X == Y) / (how many elements of the reduced set equal Y): the gradient shared evenly between ties, as
    torch's amax/amin backward does."""
    hit = b.op("Cast", b.op("Equal", x, y), to=b.elem_type(x))
    return b.op("Div", hit, b.reduce("ReduceSum", hit, axes, keepdims=1))


# d prod / dx_i = the product of the others: Y / X without zeros; with one zero, the product of the rest at
# the zero and 0 elsewhere; with several, 0
def _product_slope(b: Builder, x: str, y: str, axes: list[int]) -> str:
    zero = b.op("Equal", x, 0.0)
    zeros = b.reduce("ReduceSum", b.op("Cast", zero, to=b.elem_type(x)), axes, keepdims=1)
    rest = b.reduce("ReduceProd", b.op("Where", zero, 1.0, x), axes, keepdims=1)
    one_zero = b.op("Where", b.op("And", zero, b.op("Equal", zeros, 1.0)), rest, 0.0)
    return b.op("Where", b.op("Equal", zeros, 0.0), b.op("Div", y, x), one_zero)


# dX = expand(dY with the reduced axes kept) * dY/dX, the derivative of each reduction by one element:
REDUCTIONS: dict[str, Local | None] = {
    "ReduceSum": None,  # 1
    "ReduceMean": lambda b, x, y, axes: b.op("Reciprocal", _count(b, x, axes)),  # 1 / count
    "ReduceMax": _extreme,  # (X == Y) / ties
    "ReduceMin": _extreme,
    "ReduceL1": lambda b, x, y, axes: b.op("Sign", x),  # sign(X)
    "ReduceL2": lambda b, x, y, axes: b.op("Div", x, y),  # X / Y
    "ReduceSumSquare": lambda b, x, y, axes: b.op("Mul", x, 2.0),  # 2 X
    "ReduceLogSumExp": lambda b, x, y, axes: b.op("Exp", b.op("Sub", x, y)),  # exp(X - Y)
    "ReduceProd": _product_slope,  # the product of the others
}


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


# dX_i = dY / n for each of the n inputs
def Mean(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    share = b.op("Div", dy[0], _scalar(b, node, float(len(node.input))))
    return _binary(b, node, [share] * len(node.input))


# dX_i = dY * (X_i == Y) / (how many inputs equal Y): ties share the gradient evenly, as torch's maximum does
def _picked(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    y, elem = node.output[0], b.elem_type(node.output[0])
    hits = [b.op("Cast", b.op("Equal", _bcast(b, x, y), _y(b, node)), to=elem) for x in node.input]
    ties = hits[0] if len(hits) == 1 else b.op("Sum", *hits)
    return _binary(b, node, [b.op("Mul", dy[0], b.op("Div", hit, ties)) for hit in hits])


Max = Min = _picked


# y = X if X > 0 else slope * X  =>  dX = dY * (X > 0 ? 1 : slope)   (the slope a constant)
def PRelu(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    slope = _bcast(b, node.input[1], node.output[0])
    return [b.op("Mul", dy[0], b.op("Where", b.op("Greater", _x(b, node), 0.0), 1.0, slope))]


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


def _contract(b: Builder, g: str, axis: int, like: str, matrix: np.ndarray) -> str:
    """``g`` (the gradient of forward tensor ``like``) with axis ``axis`` of length n_out mapped to n_in by
    ``matrix`` [n_out, n_in]: out[.., j, ..] = sum_o g[.., o, ..] matrix[o, j], the transpose of a linear map
    along one axis (a selection, a padding)."""
    m, rank = b.const(matrix.astype(b.np_dtype(like)), "axis_map"), b.rank(like) + 1
    if axis == rank - 1:
        return b.op("MatMul", g, m)
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    return b.op("Transpose", b.op("MatMul", b.op("Transpose", g, perm=perm), m), perm=perm)


def _index_map(n: int, begin: int, end: int, mode: str) -> np.ndarray:
    """[n + begin + end, n]: row o is one-hot at the input element that output o of a Pad copies (zero where
    ``constant`` mode pads), as ONNX's reflect, edge and wrap modes (numpy's) choose it; negative pads crop."""
    source = np.pad(np.arange(n), (max(begin, 0), max(end, 0)), mode=mode, **(
        {"constant_values": -1} if mode == "constant" else {}))  # fmt: skip
    source = source[max(-begin, 0) : len(source) - max(-end, 0)]
    matrix = np.zeros((len(source), n))
    kept = source >= 0
    matrix[np.flatnonzero(kept), source[kept]] = 1
    return matrix


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


# dX = dY put back where the slice took it, zeros elsewhere: a Pad for steps of 1, else the transpose of the
# selection along each sliced axis (any step, negative ones too, as the ONNX spec clamps starts and ends)
def Slice(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    shape = b.shape(x)
    starts, ends = _constant_ints(b, node, 1, "starts"), _constant_ints(b, node, 2, "ends")
    axes = _constant_ints(b, node, 3, "axes") or list(range(len(starts)))
    steps = _constant_ints(b, node, 4, "steps") or [1] * len(starts)
    pads, picks = [0] * 2 * (len(shape) + 1), []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= len(shape)
        size = shape[axis]
        if size is None:
            raise _unsupported(node, "needs a static size on every sliced axis")
        begin, stop, _ = slice(start, end, step).indices(size)
        pads[_gaxis(b, node, x, axis)] = begin
        pads[_gaxis(b, node, x, axis) + len(shape) + 1] = size - max(stop, begin)
        picks.append((_gaxis(b, node, x, axis), np.eye(size)[np.arange(size)[start:end:step]]))
    if all(step == 1 for step in steps):
        return [b.op("Pad", dy[0], b.ints(pads)) if b.opset >= 11 else b.op("Pad", dy[0], pads=pads)]
    dx = dy[0]
    for axis, selection in picks:  # selection [n_out, n_in]: row o is one-hot at the element output o took
        dx = _contract(b, dx, axis, x, selection)
    return [dx]


def _pad_amounts(b: Builder, node: onnx.NodeProto) -> list[int]:
    """Begin and end pads of every axis of a Pad node (its ``axes`` input spread out)."""
    pads, rank = _constant_ints(b, node, 1, "pads"), b.rank(node.input[0])
    if len(node.input) > 3 and node.input[3]:
        axes = [a % rank for a in _constant_ints(b, node, 3, "axes")]
        full = [0] * 2 * rank
        for i, a in enumerate(axes):
            full[a], full[a + rank] = pads[i], pads[i + len(axes)]
        pads = full
    if pads[0] or pads[rank]:
        raise _unsupported(node, "it pads the batch axis")
    return pads


# constant mode, pads >= 0: dX = the unpadded window of dY; reflect, edge, wrap (or cropping): along each padded
# axis, dX[i] = the sum of dY over the outputs that copy input i
def Pad(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    mode, pads = attrs(node).get("mode", "constant"), _pad_amounts(b, node)
    rank, shape = b.rank(node.input[0]), b.shape(node.input[0])
    if mode == "constant" and all(p >= 0 for p in pads):
        starts = [pads[a] for a in range(1, rank)]
        ends = [pads[a] + shape[a] for a in range(1, rank)]
        return [b.op("Slice", dy[0], b.ints(starts), b.ints(ends), b.ints(list(range(2, rank + 1))))]
    dx = dy[0]
    for axis in range(1, rank):
        if pads[axis] or pads[axis + rank]:
            if shape[axis] is None:
                raise _unsupported(node, f"needs a static size along padded axis {axis}")
            matrix = _index_map(shape[axis], pads[axis], pads[axis + rank], mode)
            dx = _contract(b, dx, axis + 1, node.input[0], matrix)
    return [dx]


# y = tile(X, r): along each axis, y[k * d + i] = X[i]  =>  dX = dY seen as [.., r, d, ..], summed over each r
def Tile(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    repeats = b.constant_value(node.input[1])
    if repeats is None:
        raise _unsupported(node, "repeats must be a constant")
    repeats = [int(r) for r in repeats.ravel()]
    if repeats[0] != 1:
        raise _unsupported(node, "it repeats the batch axis")
    parts = [part for axis, r in enumerate(repeats[1:], start=1) for part in ([r], b.dims(x, axis, axis + 1))]
    split = b.op("Reshape", dy[0], b.op("Concat", b.dims(dy[0], 0, 2), *parts, axis=0))
    return [b.reduce("ReduceSum", split, [2 * i for i in range(1, len(repeats))], keepdims=0)]


def _unshuffle(b: Builder, node: onnx.NodeProto, dy: str, split: list[int], perm: list[int]) -> str:
    """The gradient of ``x -> reshape(transpose(reshape(x, [M] + split), perm), ...)`` on [M, C, H, W] (the
    targets folded into M): dY reshaped to the transposed split, transposed back, reshaped to X."""
    shape = b.shape(node.input[0])
    if shape is None or any(d is None for d in shape[1:]):
        raise _unsupported(node, "needs a static shape to move blocks between depth and space")
    folded, head = _fold_targets(b, dy, node.output[0])
    moved = b.op("Reshape", folded, b.op("Concat", b.product(folded, 0, 1), [split[p - 1] for p in perm[1:]], axis=0))
    back = b.op("Transpose", moved, perm=[int(i) for i in np.argsort(perm)])
    return _unfold_targets(b, b.op("Reshape", back, b.op("Concat", b.product(folded, 0, 1), shape[1:], axis=0)),
                           head, node.input[0])  # fmt: skip


# a reshape-transpose-reshape (the forward's own split and permutation, as the ONNX spec writes them)
def DepthToSpace(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a = attrs(node)
    k, (c, h, w) = int(a["blocksize"]), b.shape(node.input[0])[1:]
    if a.get("mode", "DCR") == "DCR":
        return [_unshuffle(b, node, dy[0], [k, k, c // k**2, h, w], [0, 3, 4, 1, 5, 2])]
    return [_unshuffle(b, node, dy[0], [c // k**2, k, k, h, w], [0, 1, 4, 2, 5, 3])]


def SpaceToDepth(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    k, (c, h, w) = int(attrs(node)["blocksize"]), b.shape(node.input[0])[1:]
    return [_unshuffle(b, node, dy[0], [c, h // k, k, w // k, k], [0, 3, 5, 1, 2, 4])]


def _data_axis(b: Builder, node: onnx.NodeProto, axis: int) -> int:
    """A forward axis of the node's first input as a gradient axis; the batch axis is refused."""
    axis %= b.rank(node.input[0])
    if axis == 0:
        raise _unsupported(node, "it works along the batch axis")
    return axis + 1


# y = cumsum(X) along an axis  =>  dX = cumsum(dY) in the other direction, with the same exclusivity
def CumSum(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    axis = b.constant_value(node.input[1])
    if axis is None:
        raise _unsupported(node, "axis must be a constant")
    a = attrs(node)
    gaxis = _data_axis(b, node, int(axis.ravel()[0]))
    reverse = 1 - int(a.get("reverse", 0))
    return [b.op("CumSum", dy[0], [gaxis], exclusive=int(a.get("exclusive", 0)), reverse=reverse)]


def _indices_like(b: Builder, indices: str, g: str) -> str:
    """Forward ``indices`` [N, ...] as [N, T, ...], beside the gradient ``g``."""
    return b.op("Expand", b.fwd(indices), b.op("Shape", g))


# values = X at the top k indices along the axis  =>  dX = zeros with dY scattered to those indices
def TopK(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    axis = _data_axis(b, node, int(attrs(node).get("axis", -1)))
    if dy[0] is None:
        return []
    zeros = b.zeros(b.grad_shape(dy[0], x), like=x)
    return [b.op("ScatterElements", zeros, _indices_like(b, node.output[1], dy[0]), dy[0], axis=axis)]


# y = X[I] along an axis, elementwise  =>  dX = zeros with dY added at I (repeated indices add up)
def GatherElements(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    axis = _data_axis(b, node, int(attrs(node).get("axis", 0)))
    zeros = b.zeros(b.grad_shape(dy[0], x), like=x)
    indices = _indices_like(b, node.input[1], dy[0])
    return [b.op("ScatterElements", zeros, indices, dy[0], axis=axis, reduction="add")]


def _scatter_reduction(node: onnx.NodeProto) -> str:
    reduction = attrs(node).get("reduction", "none")
    if reduction not in ("none", "add"):
        raise _unsupported(node, f"reduction={reduction!r} is not supported (only none and add)")
    return reduction


# y = X with U written at I along an axis  =>  dX = dY with zeros at I (dY where reduction=add), dU = dY at I
def ScatterElements(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x, indices, updates = node.input
    axis = _data_axis(b, node, int(attrs(node).get("axis", 0)))
    add = _scatter_reduction(node) == "add"
    at = b.op("Expand", b.fwd(indices), b.grad_shape(dy[0], updates))
    dx = None
    if b.needs(x):
        dx = dy[0] if add else b.op(
            "ScatterElements", dy[0], at, b.zeros(b.grad_shape(dy[0], updates), like=x), axis=axis)  # fmt: skip
    du = b.op("GatherElements", dy[0], at, axis=axis) if b.needs(updates) else None
    return [dx, None, du]


# The ND gathers and scatters index the leading axes, the batch among them: the target axis goes last while they
# run ([N, T, ...] -> [N, ..., T]) and back to 1 after.
def _targets_last(b: Builder, g: str, rank: int) -> str:
    return b.op("Transpose", g, perm=[0, *range(2, rank), 1])


def _targets_second(b: Builder, g: str, rank: int) -> str:
    return b.op("Transpose", g, perm=[0, rank - 1, *range(1, rank - 1)])


def _full_indices(b: Builder, node: onnx.NodeProto) -> str:
    """GatherND's indices with ``batch_dims`` = 1 made absolute: each tuple led by its batch position."""
    indices = node.input[1]
    batch_dims = int(attrs(node).get("batch_dims", 0))
    if batch_dims == 0:
        return indices
    if batch_dims != 1:
        raise _unsupported(node, "batch_dims above 1 is not supported")
    rank = b.rank(indices)
    count = b.op("Squeeze", b.dims(indices, 0, 1), [0])
    positions = b.op("Reshape", b.op("Range", 0, count, 1), [-1] + [1] * (rank - 1))
    lead = b.op("Expand", positions, b.op("Concat", b.dims(indices, 0, rank - 1), [1], axis=0))
    return b.op("Concat", b.op("Cast", lead, to=b.elem_type(indices)), indices, axis=-1)


# y = X at the index tuples I  =>  dX = zeros with dY added at I (repeated tuples add up)
def GatherND(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x, y = node.input[0], node.output[0]
    zeros = b.zeros(b.op("Concat", b.op("Shape", x), b.dims(dy[0], 1, 2), axis=0), like=x)
    updates = _targets_last(b, dy[0], b.rank(y) + 1)
    scattered = b.op("ScatterND", zeros, _full_indices(b, node), updates, reduction="add")
    return [_targets_second(b, scattered, b.rank(x) + 1)]


# y = X with U written at the index tuples I  =>  dX = dY with zeros at I (dY where reduction=add), dU = dY at I
def ScatterND(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x, indices, updates = node.input
    add = _scatter_reduction(node) == "add"
    rank = b.rank(x) + 1
    last = _targets_last(b, dy[0], rank)
    dx = None
    if b.needs(x):
        zeros = b.zeros(b.op("Concat", b.op("Shape", updates), b.dims(dy[0], 1, 2), axis=0), like=x)
        dx = dy[0] if add else _targets_second(b, b.op("ScatterND", last, indices, zeros), rank)
    du = _targets_second(b, b.op("GatherND", last, indices), b.rank(updates) + 1) if b.needs(updates) else None
    return [dx, None, du]


# y = max of X over its spatial axes  =>  dX = expand(dY) * (X == Y) / ties, as ReduceMax
def GlobalMaxPool(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    picked = _extreme(b, _x(b, node), _y(b, node), list(range(3, b.rank(x) + 1)))
    return [b.op("Mul", b.op("Expand", dy[0], b.grad_shape(dy[0], x)), picked)]


# y = X / ||X||_p along an axis (p = 1 or 2)  =>  dX = (dY - s * sum(dY * Y)) / ||X||_p, s = Y (p=2) or sign(X) (p=1)
def LpNormalization(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a, x, y = attrs(node), _x(b, node), _y(b, node)
    p, axis = int(a.get("p", 2)), [_gaxis(b, node, node.input[0], int(a.get("axis", -1)))]
    if p not in (1, 2):
        raise _unsupported(node, f"p={p} is not a norm ONNX defines (1 or 2)")
    norm = b.reduce("ReduceL2" if p == 2 else "ReduceL1", x, axis, keepdims=1)
    inner = b.reduce("ReduceSum", b.op("Mul", dy[0], y), axis, keepdims=1)
    s = y if p == 2 else b.op("Sign", x)
    return [b.op("Div", b.op("Sub", dy[0], b.op("Mul", s, inner)), norm)]


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


# y = xhat * gamma + beta, xhat = (x - mean) / sigma over some axes
# =>  dX = (g - mean(g) - xhat * mean(g * xhat)) / sigma, with g = dY * gamma
def _normalised_back(b: Builder, xt: str, g: str, axes: list[int], eps: float) -> str:
    """dX of a normalisation over gradient ``axes`` of ``xt`` (a forward tensor with the target axis), given
    ``g`` = dY * gamma."""
    centred = b.op("Sub", xt, b.reduce("ReduceMean", xt, axes, keepdims=1))
    variance = b.reduce("ReduceMean", b.op("Mul", centred, centred), axes, keepdims=1)
    sigma = b.op("Sqrt", b.op("Add", variance, eps))
    xhat = b.op("Div", centred, sigma)
    mean_g = b.reduce("ReduceMean", g, axes, keepdims=1)
    mean_gx = b.reduce("ReduceMean", b.op("Mul", g, xhat), axes, keepdims=1)
    return b.op("Div", b.op("Sub", b.op("Sub", g, mean_g), b.op("Mul", xhat, mean_gx)), sigma)


# over axes [axis, rank), gamma of the normalised axes' shape
def LayerNormalization(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x, a = node.input[0], attrs(node)
    rank = b.rank(x)
    axes = [_gaxis(b, node, x, i) for i in range(int(a.get("axis", -1)) % rank, rank)]
    g = b.op("Mul", dy[0], node.input[1])
    return [_normalised_back(b, b.fwd(x), g, axes, float(a.get("epsilon", 1e-5)))]


def _per_channel(b: Builder, values: str, x: str) -> str:
    """A per-channel ``[C]`` tensor shaped to broadcast against the gradient of ``x`` ``[N, C, ...]``."""
    return b.op("Reshape", values, [-1] + [1] * (b.rank(x) - 2))


# over each (n, c)'s spatial axes, gamma per channel
def InstanceNormalization(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x = node.input[0]
    axes = [_gaxis(b, node, x, i) for i in range(2, b.rank(x))]
    g = b.op("Mul", dy[0], _per_channel(b, node.input[1], x))
    return [_normalised_back(b, b.fwd(x), g, axes, float(attrs(node).get("epsilon", 1e-5)))]


# over each group of C / G channels with their spatial axes; gamma per channel (opset 21) or per group (18)
def GroupNormalization(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    x, a = node.input[0], attrs(node)
    groups, channels = int(a["num_groups"]), (b.shape(x) or [None, None])[1]
    if channels is None:
        raise _unsupported(node, "needs a static channel count")
    scale = node.input[1]
    if (b.shape(scale) or [None])[0] != channels:  # one per group: each channel reads its group's
        scale = b.op("Gather", scale, np.arange(channels) // (channels // groups))
    g = b.op("Mul", dy[0], _per_channel(b, scale, x))
    def grouped(t: str) -> str:  # [N, T, C, ...] -> [N, T, G, C / G * ...]
        rest = b.op("Div", b.product(t, 2), [groups])
        return b.op("Reshape", t, b.op("Concat", b.dims(t, 0, 2), [groups], rest, axis=0))

    dx = _normalised_back(b, grouped(b.fwd(x)), grouped(g), [3], float(a.get("epsilon", 1e-5)))
    return [b.op("Reshape", dx, b.grad_shape(dy[0], x))]


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
    "round_prefer_floor": lambda x, scale: np.where(x - np.floor(x) == 0.5, np.floor(x), np.round(x)),
    "round_prefer_ceil": lambda x, scale: np.where(x - np.floor(x) == 0.5, np.ceil(x), np.round(x)),
    "floor": lambda x, scale: np.floor(x),
    "ceil": lambda x, scale: np.ceil(x),
    "simple": lambda x, scale: np.ceil(x) if scale < 1 else np.trunc(x),  # (Upsample's, before opset 11)
}


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """[n, 4]: the weights of the neighbours floor(x) - 1 ... floor(x) + 2 at fractions ``t`` (Keys' cubic
    convolution with coefficient ``a``, as the ONNX spec and torch's bicubic write it)."""
    def near(d: np.ndarray) -> np.ndarray:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: np.ndarray) -> np.ndarray:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


def _resize_matrix(a: dict, scale: float, n_in: int, n_out: int) -> np.ndarray:
    """R [n_out, n_in] with y = R x along one axis, for Resize's nearest, linear or cubic mode."""
    x = RESIZE_COORDINATES[a.get("coordinate_transformation_mode", "half_pixel")](
        np.arange(n_out, dtype=np.float64), scale, n_in, n_out
    )
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    mode = a.get("mode", "nearest")
    if mode == "nearest":
        picked = NEAREST[a.get("nearest_mode", "round_prefer_floor")](x, scale)
        matrix[rows, np.clip(picked, 0, n_in - 1).astype(int)] = 1
        return matrix
    if mode == "cubic":  # neighbours past the edge read the edge, or (exclude_outside) drop out, renormalised
        low = np.floor(x).astype(int)
        weights = _cubic_weights(x - low, float(a.get("cubic_coeff_a", -0.75)))
        taps = low[:, None] + np.arange(-1, 3)
        if int(a.get("exclude_outside", 0)):
            weights = np.where((taps >= 0) & (taps < n_in), weights, 0.0)
            weights /= weights.sum(axis=1, keepdims=True)
        np.add.at(matrix, (np.repeat(rows, 4), np.clip(taps, 0, n_in - 1).ravel()), weights.ravel())
        return matrix
    x = np.clip(x, 0, n_in - 1)
    low = np.floor(x).astype(int)
    high, frac = np.minimum(low + 1, n_in - 1), x - low
    np.add.at(matrix, (rows, low), 1 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def _separable_back(b: Builder, node: onnx.NodeProto, dy: str, a: dict, scales: np.ndarray | None) -> str:
    """The gradient of a 4-D resize of static h, w that ``a`` (Resize's attributes) describes, at ``scales``
    (or the ratio of the sizes): y = R_h X R_w^T  =>  dX = R_h^T dY R_w."""
    x = node.input[0]
    shape_in, shape_out = b.shape(x), b.shape(node.output[0])
    supported = (
        shape_in is not None and shape_out is not None and len(shape_in) == len(shape_out) == 4
        and all(isinstance(d, int) for d in [*shape_in[1:], *shape_out[1:]]) and shape_in[1] == shape_out[1]
        and a.get("mode", "nearest") in ("nearest", "linear", "cubic") and not a.get("antialias", 0)
        and "axes" not in a and a.get("coordinate_transformation_mode", "half_pixel") in RESIZE_COORDINATES
        and a.get("nearest_mode", "round_prefer_floor") in NEAREST
        and a.get("keep_aspect_ratio_policy", "stretch") == "stretch"
    )  # fmt: skip
    if not supported:
        raise _unsupported(node, "only 4-D nearest, linear or cubic resizing of static h, w (half_pixel, "
                                 "pytorch_half_pixel, align_corners or asymmetric coordinates, no antialias) "
                                 "is supported")  # fmt: skip
    factors = [float(v) for v in scales[2:]] if scales is not None and scales.size == 4 else [
        o / i for i, o in zip(shape_in[2:], shape_out[2:], strict=True)]  # fmt: skip
    r_h, r_w = (_resize_matrix(a, f, i, o) for f, i, o in zip(factors, shape_in[2:], shape_out[2:], strict=True))
    dtype = b.np_dtype(x)
    rows = b.op("MatMul", dy, b.const(r_w.astype(dtype), "resize_w"))  # [N, T, C, H_out, w_in]
    return b.op("MatMul", b.const(r_h.T.astype(dtype), "resize_h_t"), rows)


# y = R_h X R_w^T over (h, w), R the interpolation along one axis (nearest, linear or cubic)
def Resize(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    scales = b.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if b.opset < 11:
        raise _unsupported(node, "Resize before opset 11 is not supported (upgrade the opset)")
    return [_separable_back(b, node, dy[0], attrs(node), scales)]


# Upsample (opsets 7 to 9): Resize with asymmetric coordinates, its nearest mode truncating (ceiling when it shrinks)
def Upsample(b: Builder, node: onnx.NodeProto, dy: list[Grad]) -> list[Grad]:
    a = attrs(node)
    scales = b.constant_value(node.input[1]) if len(node.input) > 1 else np.asarray(a.get("scales", []))
    if scales is None:
        raise _unsupported(node, "scales must be a constant")
    resize = {"mode": a.get("mode", "nearest"), "coordinate_transformation_mode": "asymmetric",
              "nearest_mode": "simple"}
    return [_separable_back(b, node, dy[0], resize, scales)]


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
    "Identity": Identity, "Dropout": Dropout, "Relu": Relu, "LeakyRelu": LeakyRelu, "PRelu": PRelu, "Clip": Clip,
    "Sigmoid": Sigmoid, "HardSigmoid": HardSigmoid, "HardSwish": HardSwish, "Sqrt": Sqrt, "Erf": Erf,
    "Gelu": Gelu, "Tanh": Tanh, "Exp": Exp, "Neg": Neg, "Pow": Pow, "Cast": Cast, "Add": Add, "Sum": Sum,
    "Sub": Sub, "Mul": Mul, "Div": Div, "Mean": Mean, "Max": Max, "Min": Min, "Where": Where, "Flatten": Flatten,
    "Reshape": Reshape, "Squeeze": Squeeze, "Unsqueeze": Unsqueeze, "Expand": Expand, "Transpose": Transpose,
    "Concat": Concat, "Split": Split, "Slice": Slice, "Pad": Pad, "Tile": Tile, "DepthToSpace": DepthToSpace,
    "SpaceToDepth": SpaceToDepth, "Gather": Gather, "CumSum": CumSum, "TopK": TopK, "ScatterElements": ScatterElements,
    "ScatterND": ScatterND, "Gemm": Gemm, "MatMul": MatMul, "Einsum": Einsum, "Conv": Conv,
    "ConvTranspose": ConvTranspose, "Resize": Resize, "Upsample": Upsample, "AveragePool": AveragePool,
    "LpPool": LpPool, "GlobalAveragePool": GlobalAveragePool, "GlobalMaxPool": GlobalMaxPool,
    **{op: _reduction(local, identity=op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd"))
       for op, local in REDUCTIONS.items()},
    "BatchNormalization": BatchNormalization, "LayerNormalization": LayerNormalization,
    "InstanceNormalization": InstanceNormalization, "GroupNormalization": GroupNormalization,
    "LpNormalization": LpNormalization, "Softmax": Softmax, "LogSoftmax": LogSoftmax,
    "DequantizeLinear": DequantizeLinear,
    "Abs": Abs, "Log": Log, "Reciprocal": Reciprocal, "Sin": Sin, "Cos": Cos, "Softplus": Softplus,
    "Softsign": Softsign, "Elu": Elu, "Selu": Selu, "Celu": Celu, "ThresholdedRelu": ThresholdedRelu, "Mish": Mish,
}.items()} | {
    "MaxPool": Rule(MaxPool, extra_outputs=("indices",), opset=16),
    "GatherElements": Rule(GatherElements, opset=16),
    "GatherND": Rule(GatherND, opset=16),
    "GridSample": Rule(GridSample, opset=16),
    "QuantizeLinear": Rule(QuantizeLinear, levels=True),
}  # fmt: skip
GUIDED: dict[str, Rule] = {"Relu": Rule(GuidedRelu), "Clip": Rule(GuidedClip)}  # Guided Backpropagation's rules
