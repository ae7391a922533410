"""A detector's backward, box by box, over the small window of each feature map that the box reads.

A box's class score at anchor pixel (y, x) of one scale reads a window of each feature map below
it (YOLOv8n: 5x5 of its own head input through two 3x3 convolutions; 47x47 of P3 for a P5 box
through the PAN), and its gradient is exactly zero elsewhere. The dense backward
(:func:`onnxcam_export.walk.backward` over whole maps, once per target) spends nearly all of its
work multiplying those zeros. Here the graph is cut in two:

* the *region*: the nodes from the target layers up to each scale's *boundary* tensors (the last
  ``[N, C, h, w]`` tensors before the spatial grid is flattened into anchors) whose output cell
  reads a fixed window of each input (:data:`LOCAL`: convolutions, point-wise ops, channel concat
  and split);
* the *tail*: the rest up to the class scores, which maps each anchor's pixel to its scores.

The tail is walked once per *round* rather than once per target: a round's seed holds one target
per anchor pixel, so that each pixel's gradient is that target's (rounds > 1 only where two
targets share a pixel). Then, per scale, and only for the ``M`` targets on it, the region's nodes are
copied onto windows ``[M, C, n, n]`` around each target's pixel (convolutions unpadded, their
inputs zeroed outside the map as the padding did) and walked back from the pixel's gradient. The
copies are for the walker to read, not to run: the forward values its rules need are gathered from
the forward's own tensors (point-wise ones recomputed from them), so no convolution runs twice. A
window's gradient summed is the target's ``sum_hw(dy/dA)``; scattered back it is the full gradient.

The anchor -> pixel map assumed (scales finest first, anchors of a scale ``(j, y, x)`` row-major)
is the YOLO convention; :func:`onnxcam_export.from_onnx.graft_file` checks the result against the
dense walk on a probe and keeps the dense one where they differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxcam import contract
from onnxcam_export.builder import Builder
from onnxcam_export.ops import ops_with
from onnxcam_export.vjp import _explicit_pads, attrs
from onnxcam_export.walk import SPATIAL, Branch, backward, differentiable, gradient_of, static_tensors

POINTWISE, LOCAL = ops_with("pointwise"), ops_with("local")  # LOCAL: cell (y, x) reads a window around it

WINDOW_TAG = "@window"  # in the names of the windowed copies of the region's nodes
Axis = tuple[int, int, int]  # rows [stride * p + offset, ... + size) for the boundary pixel coordinate p
Window = tuple[Axis, Axis]  # (y, x)


def _union(a: Window, b: Window) -> Window:
    out = []
    for (s1, c1, n1), (s2, c2, n2) in zip(a, b, strict=True):
        if s1 != s2:
            raise ValueError("windows at different strides")
        start = min(c1, c2)
        out.append((s1, start, max(c1 + n1, c2 + n2) - start))
    return out[0], out[1]


@dataclass
class Scale:
    """One feature scale: its boundary tensors (same ``h, w``), the region nodes they read, every tensor's window."""

    boundaries: list[str]
    grid: tuple[int, int]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    window: dict[str, Window] = field(default_factory=dict)


@dataclass
class Cut:
    """The cut of a detector's head: the tail, the scales (finest first) and the anchors per pixel."""

    tail: list[onnx.NodeProto]
    scales: list[Scale]
    per_pixel: int


def _conv_geometry(node: onnx.NodeProto, b: Builder) -> tuple[list[int], list[int], list[int], list[int]]:
    """kernel, strides, dilations, begin pads of a 2-D Conv."""
    a, w_shape = attrs(node), b.shape(node.input[1])
    kernel = list(a.get("kernel_shape", w_shape[2:]))
    strides, dilations = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
    pads = _explicit_pads(a, b.shape(node.input[0])[2:], kernel, strides, dilations)
    return kernel, strides, dilations, pads[:2]


def _is_local(node: onnx.NodeProto, b: Builder, static: set[str]) -> bool:
    """Whether ``node`` is a :data:`LOCAL` op on 4-D tensors whose output cell reads a window around it."""
    if node.op_type not in LOCAL:
        return False
    shapes = [b.shape(o) for o in node.output if o]
    if not shapes or any(s is None or len(s) != 4 or None in s[1:] for s in shapes):
        return False
    grid = shapes[0][2:]
    if node.op_type in ("Concat", "Split") and attrs(node).get("axis", 0) not in (1, -3):
        return False
    if node.op_type == "Conv":
        w_shape = b.shape(node.input[1])
        return node.input[1] in static and w_shape is not None and len(w_shape) == 4 and None not in w_shape
    for name in node.input[: 1 if node.op_type in ("BatchNormalization", "Split", "Clip") else None]:
        shape = b.shape(name) if name else []
        if not name:
            continue
        if name in static:  # a constant operand must not vary over the grid
            if shape is None or (len(shape) >= 2 and any(d != 1 for d in shape[-2:])):
                return False
        elif shape is None or len(shape) != 4 or shape[2:] != grid:
            return False
    return True


def cut(graph: onnx.GraphProto, head: Sequence[onnx.NodeProto], sources: Sequence[str], b: Builder) -> Cut | None:
    """The region/tail cut of ``head`` (from ``sources`` to :data:`contract.LOGITS` ``[N, K, A]``), or None
    where the region reaches no boundary or the anchors do not tile the boundary pixels."""
    static = static_tensors(graph)
    downstream = set(sources)
    for node in head:
        if downstream.intersection(node.input):
            downstream.update(o for o in node.output if o)
    region, produced = [], set(sources)
    for node in head:
        inputs = [i for i in node.input if i and i not in static]
        if _is_local(node, b, static) and all(i in produced or i not in downstream for i in inputs):
            region.append(node)
            produced.update(o for o in node.output if o)
    inside = {o for n in region for o in n.output if o} | set(sources)
    tail = [n for n in head if n not in region]
    boundaries = list(dict.fromkeys(i for n in tail for i in n.input if i in inside))
    if not boundaries or any(len(b.shape(t) or []) != 4 for t in boundaries):
        return None
    scales: dict[tuple[int, int], Scale] = {}
    for name in boundaries:
        grid = tuple(b.shape(name)[2:])
        scales.setdefault(grid, Scale([], grid)).boundaries.append(name)
    ordered = sorted(scales.values(), key=lambda s: -s.grid[0] * s.grid[1])
    pixels = sum(s.grid[0] * s.grid[1] for s in ordered)
    anchors = b.shape(contract.LOGITS)[2]
    if anchors % pixels:
        return None
    for scale in ordered:
        _windows(scale, region, b)
    if not all(any(source in scale.window for scale in ordered) for source in sources):
        return None  # (a target layer whose gradient leaves through the tail)
    return Cut(tail, ordered, anchors // pixels)


def _windows(scale: Scale, region: list[onnx.NodeProto], b: Builder) -> None:
    """The region nodes ``scale``'s boundaries read and the window of every tensor involved (a union over
    its readers), walking back from a 1x1 window at the boundary pixel."""
    for name in scale.boundaries:
        scale.window[name] = ((1, 0, 1), (1, 0, 1))
    for node in reversed(region):
        outs = [scale.window[o] for o in node.output if o in scale.window]
        if not outs:
            continue
        scale.nodes.insert(0, node)
        out = outs[0]
        for other in outs[1:]:
            out = _union(out, other)
        for name in node.output:
            if name in scale.window:
                scale.window[name] = out  # (a Split's outputs are all cut from one input window)
        for name, need in _input_windows(node, out, b).items():
            scale.window[name] = need if name not in scale.window else _union(scale.window[name], need)


def _input_windows(node: onnx.NodeProto, out: Window, b: Builder) -> dict[str, Window]:
    """The window each non-constant input of ``node`` must hold for its output to hold ``out``."""
    if node.op_type == "Conv":
        kernel, strides, dilations, pads = _conv_geometry(node, b)
        need = tuple(
            (s * st, st * c - p, (n - 1) * st + (k - 1) * d + 1)
            for (s, c, n), k, st, d, p in zip(out, kernel, strides, dilations, pads, strict=True)
        )
        return {node.input[0]: need}
    inputs = node.input[:1] if node.op_type in ("BatchNormalization", "Split", "Clip") else node.input
    return {name: out for name in inputs if name and b.shape(name) is not None and len(b.shape(name)) == 4
            and name not in b.constants}  # fmt: skip


# -- in the grafted graph ----------------------------------------------------------------------------
class _Targets:
    """Per scale, the target rows whose anchor lies there (``keep``: indices into the ``N * T`` rows) and their
    image, pixel row and column, ``[M]`` int64 each; every target's image ``[N, T]`` (``images``) and its pixel
    over all scales (``key``)."""

    def __init__(self, b: Builder, p: Cut, flat: str) -> None:
        anchors = b.shape(contract.LOGITS)[2]
        anchor = b.op("Mod", flat, anchors)  # [N, T]
        self.rows = b.product(flat, 0)  # N * T, [1]
        self.images = _image_index(b, flat)  # [N, T]
        image = b.op("Reshape", self.images, self.rows)
        key = b.value(-1)
        self.keep, self.image, self.y, self.x, start, first_pixel = [], [], [], [], 0, 0
        for scale in p.scales:
            h, w = scale.grid
            count = p.per_pixel * h * w
            local = b.op("Sub", anchor, start)
            on = b.op("And", b.op("GreaterOrEqual", local, 0), b.op("Less", local, count))
            pixel = b.op("Mod", local, h * w)  # (>= 0: Mod takes the divisor's sign)
            key = b.op("Where", on, b.op("Add", pixel, first_pixel), key)
            keep = b.op("Reshape", b.op("NonZero", b.op("Reshape", on, self.rows)), b.ints([-1]))
            pixel = b.op("Gather", b.op("Reshape", pixel, self.rows), keep)
            width = b.value(w)
            self.keep.append(keep)
            self.image.append(b.op("Gather", image, keep))
            self.y.append(b.op("Div", pixel, width))
            self.x.append(b.op("Mod", pixel, width))
            start, first_pixel = start + count, first_pixel + h * w
        self.key = key  # [N, T]


def _image_index(b: Builder, flat: str) -> str:
    """The image of each target row, ``[N, T]`` int64."""
    images = b.op("Squeeze", b.dims(flat, 0, 1), b.ints([0]))
    index = b.op("Range", 0, images, 1)
    return b.op("Expand", b.unsqueeze(index, [1]), b.op("Shape", flat))


def _rounds(b: Builder, key: str) -> tuple[str, str]:
    """Each target's round ``[N, T]`` (how many earlier targets of its image share its pixel) and the round
    count ``[1]``."""
    count = b.op("Squeeze", b.dims(key, 1, 2), b.ints([0]))
    index = b.op("Range", 0, count, 1)
    earlier = b.op("Less", b.unsqueeze(index, [0]), b.unsqueeze(index, [1]))  # [T (this), T (other)]: other < this
    same = b.op("Equal", b.unsqueeze(key, [2]), b.unsqueeze(key, [1]))  # [N, T, T]
    shared = b.op("Cast", b.op("And", same, earlier), to=TensorProto.INT64)
    rounds = b.reduce("ReduceSum", shared, [2], keepdims=0)
    most = b.reduce("ReduceMax", b.op("Concat", b.op("Reshape", rounds, b.ints([-1])), b.ints([0]), axis=0), [0],
                    keepdims=1)  # fmt: skip
    return rounds, b.op("Add", most, b.ints([1]))


def _round_seed(b: Builder, targets: _Targets, flat: str, valid: str, rounds: str, count: str) -> str:
    """The tail's seed ``[N, R, K, A]``: target t one-hot in round rounds[t]."""
    _, classes, anchors = b.shape(contract.LOGITS)
    shape = b.op("Concat", b.dims(flat, 0, 1), count, b.ints([classes * anchors]), axis=0)
    where = b.op("Concat", *(b.unsqueeze(x, [2]) for x in (targets.images, rounds, flat)), axis=2)  # [N, T, 3]
    seed = b.op(
        "ScatterND", b.zeros(shape, like=contract.LOGITS), where, b.op("Cast", valid, to=b.elem_type(contract.LOGITS))
    )
    return b.op("Reshape", seed, b.op("Concat", b.dims(flat, 0, 1), count, b.ints([classes, anchors]), axis=0))


def _typed(b: Builder, name: str, like: str, dims: Sequence[int]) -> str:
    """Record the type of windowed tensor ``name``: ``like``'s element type, ``[M] + dims`` (M targets)."""
    t = onnx.TypeProto.Tensor()
    t.elem_type = b.elem_type(like)
    t.shape.dim.add().dim_param = "NT"
    for d in dims:
        t.shape.dim.add().dim_value = int(d)
    b.types[name] = t
    return name


class _Windows:
    """Gathers, masks and the scatter back of windows; gathers' indices and masks built once per branch."""

    def __init__(self, b: Builder, p: Cut, targets: _Targets) -> None:
        self.b, self.targets = b, targets
        self.pads: dict[str, tuple[int, int, int, int]] = {}  # tensor -> (top, bottom, left, right) zeros
        for scale in p.scales:
            for name, window in scale.window.items():
                h, w = b.shape(name)[2:]
                (sy, cy, ny), (sx, cx, nx) = window
                hb, wb = scale.grid
                need = (
                    max(0, -cy),
                    max(0, sy * (hb - 1) + cy + ny - h),
                    max(0, -cx),
                    max(0, sx * (wb - 1) + cx + nx - w),
                )
                old = self.pads.get(name, (0, 0, 0, 0))
                self.pads[name] = tuple(max(a, c) for a, c in zip(old, need, strict=True))
        self._flat: dict[str, str] = {}
        self._masks: dict[tuple, str] = {}
        self._gathers: dict[tuple, str] = {}  # (scale, window, C, H, W) -> gather index

    def forget(self) -> None:
        """Drop the tensors built so far: a new If branch cannot read another's."""
        self._flat.clear()
        self._masks.clear()
        self._gathers.clear()

    def _start(self, scale: int, axis: int, window: Window, pad: int) -> str:
        """The first row (axis 0) or column of each target's window in the padded tensor, ``[M]``."""
        s, c, _ = window[axis]
        position = (self.targets.y if axis == 0 else self.targets.x)[scale]
        return self.b.op("Add", self.b.op("Mul", position, s), c + pad)

    def _index(self, scale: int, name: str, window: Window) -> str:
        """``[M, ny, nx]`` row-in-image * Wp + column of each window cell in the padded tensor."""
        b = self.b
        top, _, left, right = self.pads[name]
        width = b.shape(name)[3] + left + right
        (_, _, ny), (_, _, nx) = window
        first = b.op("Add", b.op("Mul", self._start(scale, 0, window, top), width),
                     self._start(scale, 1, window, left))  # fmt: skip
        grid = (np.arange(ny)[:, None] * width + np.arange(nx)[None, :]).astype(np.int64)
        return b.op("Add", b.unsqueeze(first, [1, 2]), b.const(grid))

    def gather(self, scale: int, name: str, window: Window, output: str | None = None) -> str:
        """Tensor ``name`` ``[N, C, H, W]`` cut to each target's ``window``: ``[M, C, ny, nx]``. Cells outside the
        map repeat its edge: :meth:`mask` zeroes them where a convolution reads them, as its padding did, and
        nothing else reaches the window's centre from them."""
        b = self.b
        channels, h, w = b.shape(name)[1:]
        if name not in self._flat:
            self._flat[name] = b.op("Reshape", name, b.ints([-1]))
        key = (scale, window, channels, h, w)  # (tensors of one shape share their windows' cells)
        if key not in self._gathers:
            self._gathers[key] = self._cells(scale, window, channels, h, w)
        output = output or b.fresh("window")
        b.op("Gather", self._flat[name], self._gathers[key], name=output, axis=0)
        return _typed(b, output, name, [channels, window[0][2], window[1][2]])

    def _cells_along(self, scale: int, axis: int, window: Window) -> str:
        """``[M, n]``: the rows (axis 0) or columns of each target's window in the map, unclamped."""
        cells = np.arange(window[axis][2], dtype=np.int64)
        return self.b.op("Add", self.b.unsqueeze(self._start(scale, axis, window, 0), [1]), self.b.const(cells))

    def _cells(self, scale: int, window: Window, channels: int, h: int, w: int) -> str:
        """``[M, C, ny, nx]`` indices of each target's window cells in a flattened ``[N, C, H, W]`` tensor, rows and
        columns clamped to the map."""
        b, cells = self.b, []
        for axis, size in enumerate((h, w)):
            cell = self._cells_along(scale, axis, window)
            cells.append(b.op("Max", b.op("Min", cell, size - 1), 0))  # [M, ny] rows, [M, nx] columns
        image = b.op("Mul", self.targets.image[scale], channels * h * w)
        planes = b.const(np.arange(channels, dtype=np.int64).reshape(1, -1, 1, 1) * h * w)
        index = b.op("Add", b.unsqueeze(image, [1, 2, 3]), planes)
        index = b.op("Add", index, b.unsqueeze(b.op("Mul", cells[0], w), [1, 3]))
        return b.op("Add", index, b.unsqueeze(cells[1], [1, 2]))

    def mask(self, scale: int, name: str, window: Window) -> str | None:
        """1 where each target's ``window`` of ``name`` lies inside the map, else 0: ``[M, 1, ny, nx]``; None
        where every window lies inside."""
        b = self.b
        if not any(self.pads[name]):
            return None
        h, w = b.shape(name)[2:]
        (_, _, ny), (_, _, nx) = window
        key = (scale, h, w, window)
        if key in self._masks:
            return self._masks[key]
        parts = []
        for axis, size in enumerate((h, w)):
            cells = self._cells_along(scale, axis, window)
            inside = b.op("And", b.op("GreaterOrEqual", cells, 0), b.op("Less", cells, size))
            parts.append(b.op("Cast", inside, to=b.elem_type(name)))
        rows, cols = b.unsqueeze(parts[0], [1, 3]), b.unsqueeze(parts[1], [1, 2])
        self._masks[key] = _typed(b, b.op("Mul", rows, cols), name, [1, ny, nx])
        return self._masks[key]

    def place(self, layer: str, placed: list[tuple[int, Window, str]]) -> str:
        """The window gradients ``[M, 1, C, ny, nx]`` of each scale in ``placed`` put in zeros ``[N * T, C, H, W]``,
        at their target rows: one scatter into the padded map, then the map cut out."""
        b = self.b
        top, bottom, left, right = self.pads[layer]
        channels, h, w = b.shape(layer)[1:]
        plane = (h + top + bottom) * (w + left + right)
        indices, updates = [], []
        for scale, window, grad in placed:
            cells = (window[0][2] * window[1][2],)
            row = b.op("Mul", self.targets.keep[scale], channels * plane)  # [M]
            first = b.op("Add", b.unsqueeze(row, [1]), b.const(np.arange(channels, dtype=np.int64) * plane))  # [M, C]
            local = b.op("Reshape", self._index(scale, layer, window), b.op("Concat", b.dims(grad, 0, 1),
                         b.ints([1, *cells]), axis=0))  # fmt: skip
            indices.append(b.op("Reshape", b.op("Add", b.unsqueeze(first, [2]), local), b.ints([-1])))
            updates.append(b.op("Reshape", grad, b.ints([-1])))
        size = b.op("Mul", self.targets.rows, b.value([channels * plane]))
        join = (lambda xs: xs[0]) if len(placed) == 1 else (lambda xs: b.op("Concat", *xs, axis=0))
        flat = b.op("ScatterElements", b.zeros(size, like=layer), join(indices), join(updates), axis=0)
        padded = b.op("Reshape", flat, b.op("Concat", self.targets.rows, b.ints([channels, h + top + bottom,
                      w + left + right]), axis=0))  # fmt: skip
        return b.op("Slice", padded, b.ints([top, left]), b.ints([top + h, left + w]), b.ints([2, 3]))


def _crop(b: Builder, x: str, have: Window, want: Window, like: str) -> str:
    """Windowed ``x`` (holding ``have``) cut to ``want`` (inside it)."""
    if have == want:
        return x
    starts = [w[1] - h[1] for h, w in zip(have, want, strict=True)]
    ends = [s + w[2] for s, w in zip(starts, want, strict=True)]
    cut = b.op("Slice", x, b.ints(starts), b.ints(ends), b.ints([2, 3]))
    return _typed(b, cut, like, [b.shape(like)[1], want[0][2], want[1][2]])


def _virtual_copy(
    b: Builder, index: int, scale: Scale, windows: _Windows
) -> tuple[list[onnx.NodeProto], int, dict, dict]:
    """The region nodes of ``scale`` on windows, for the walker to read, not to run: the nodes (gathers of the
    inputs, then crops, masks and the copies), where the gathers end, the windowed name of each tensor, and the
    (tensor, window) that each copy's output holds, which :func:`_materialise` gathers from the forward's own
    tensor instead."""
    names: dict[str, str] = {}
    holds: dict[str, tuple[str, Window]] = {}
    produced = {o for n in scale.nodes for o in n.output if o}
    with b.subgraph() as nodes:
        for name, window in scale.window.items():
            if name not in produced:  # a target layer, or a tensor from outside the head (a lateral input)
                names[name] = windows.gather(index, name, window)
        inputs_end = len(nodes)  # (the walk stops at the gathered inputs)
        for node in scale.nodes:
            out_window = next(scale.window[o] for o in node.output if o in scale.window)
            needs = _input_windows(node, out_window, b)
            inputs = []
            for name in node.input:
                if name not in needs:
                    inputs.append(name)
                    continue
                x = _crop(b, names[name], scale.window[name], needs[name], name)
                mask = windows.mask(index, name, needs[name]) if node.op_type == "Conv" else None
                if mask is not None:  # zeros outside the map, as the convolution's padding reads
                    dims = [b.shape(name)[1], needs[name][0][2], needs[name][1][2]]
                    x = _typed(b, b.op("Mul", x, mask), name, dims)
                inputs.append(x)
            outputs = [f"{o}{WINDOW_TAG}{index}" if o else "" for o in node.output]
            kept = [a for a in node.attribute if node.op_type != "Conv" or a.name not in ("pads", "auto_pad")]
            copy = b.node(node.op_type, inputs, outputs, name=f"{node.name or node.output[0]}{WINDOW_TAG}{index}")
            copy.attribute.extend(kept)
            if node.op_type == "Conv":
                copy.attribute.append(helper.make_attribute("pads", [0, 0, 0, 0]))
            b.nodes.append(copy)
            for o, new in zip(node.output, outputs, strict=True):
                if o:
                    names[o] = _typed(b, new, o, [b.shape(o)[1], out_window[0][2], out_window[1][2]])
                    holds[new] = (o, out_window)
    return nodes, inputs_end, names, holds


def _materialise(
    b: Builder, index: int, windows: _Windows, virtual: list[onnx.NodeProto], holds: dict, start: int
) -> None:
    """Put before ``b.nodes[start:]`` (the walk) what it reads of the ``virtual`` nodes: a copy's output gathered
    from the forward's tensor (the same values: the forward computed them), the rest (masks, crops) as built.
    A rule that reads only a virtual tensor's shape gets it from the target count and the window's size."""
    outputs = {o for node in virtual for o in node.output}
    rows = b.fresh("rows")
    walked = [
        b.node("Concat", [rows, b.shape(node.input[0])[1:]], node.output, name=node.name, axis=0)
        if node.op_type == "Shape" and not node.attribute and node.input[0] in outputs
        else node
        for node in b.nodes[start:]
    ]
    b.nodes[start:] = [b.node("Shape", [windows.targets.keep[index]], [rows], name=rows), *walked]
    needed = {i for node in b.nodes[start:] for i in node.input}
    kept: list[onnx.NodeProto] = []
    gathered: list[str] = []
    for node in reversed(virtual):
        wanted = [o for o in node.output if o in needed]
        if not wanted:
            continue
        if node.output[0] in holds and node.op_type not in POINTWISE:  # (point-wise ops: cheaper to recompute)
            gathered += wanted
            continue
        kept.append(node)
        needed.update(node.input)
    at = len(b.nodes)
    windows.forget()  # (what the virtual nodes cached is not run: the gathers build their own)
    for name in gathered:
        windows.gather(index, *holds[name], output=name)
    made = b.nodes[at:]
    del b.nodes[at:]
    b.nodes[start:start] = made + kept[::-1]


def walk(b: Builder, p: Cut, flat: str, valid: str, layers: Sequence[str]) -> tuple[list[str], list[Branch]]:
    """Per target layer: ``sum_hw(dy/dA)`` ``[N, T, C]`` of every target row, and the If branch that builds
    its full gradient ``[N, T, C, h, w]``."""
    targets = _Targets(b, p, flat)
    rounds, count = _rounds(b, targets.key)
    tail = backward(b, p.tail, {contract.LOGITS: [_round_seed(b, targets, flat, valid, rounds, count)]})
    rounds = b.op("Reshape", rounds, targets.rows)
    windows = _Windows(b, p, targets)
    parts: dict[str, list[str]] = {layer: [] for layer in layers}
    placed: dict[str, list[tuple[int, Window, str]]] = {layer: [] for layer in layers}
    for index, scale in enumerate(p.scales):
        reached = [layer for layer in layers if layer in scale.window]  # (gathered, or computed from one that is)
        if not reached:
            continue
        with b.subgraph() as nodes:  # run only when a target lies on this scale
            found = _scale_walk(b, index, scale, windows, targets, rounds, tail, reached)
        with b.subgraph() as nothing:
            empty = [_zeros_like_rows(b, layer, targets.rows, scale.window[layer]) for layer in reached]
        outputs = [b.fresh(f"scale{index}_{what}") for _ in reached for what in ("summed", "gradient")]
        present = b.op("Greater", b.op("Squeeze", b.op("Shape", targets.keep[index]), [0]), 0)
        flat_found, flat_empty = [n for pair in found for n in pair], [n for pair in empty for n in pair]
        b.if_(present, (nodes, flat_found), (nothing, flat_empty), outputs, b.elem_type(contract.LOGITS),
              node=f"onnxcam/scale{index}{WINDOW_TAG}")  # fmt: skip
        for i, layer in enumerate(reached):
            parts[layer].append(outputs[2 * i])
            placed[layer].append((index, scale.window[layer], outputs[2 * i + 1]))
    sums, branches = [], []
    for layer in layers:
        if not parts[layer]:
            raise ValueError(f"no target window reaches {layer!r}")
        summed = parts[layer][0] if len(parts[layer]) == 1 else b.op("Sum", *parts[layer])
        sums.append(b.op("Reshape", summed, b.op("Concat", b.dims(flat, 0, 2), b.dims(layer, 1, 2), axis=0)))
        with b.subgraph() as nodes:
            shape = b.op("Concat", b.dims(flat, 0, 2), b.dims(layer, 1), axis=0)
            branches.append((nodes, b.op("Reshape", windows.place(layer, placed[layer]), shape)))
    return sums, branches


def _scale_walk(
    b: Builder, index: int, scale: Scale, windows: _Windows, targets: _Targets, rounds: str, tail: dict,
    layers: list[str],
) -> list[tuple[str, str]]:  # fmt: skip
    """The window walk of the targets on scale ``index``: per layer of ``layers``, ``sum_hw(dy/dA)`` placed in
    the ``[N * T, 1, C]`` rows and the window gradients ``[M, 1, C, ny, nx]``."""
    keep = targets.keep[index]
    windows.forget()
    virtual, inputs_end, names, holds = _virtual_copy(b, index, scale, windows)
    copies = virtual[inputs_end:]
    start = len(b.nodes)
    where = (targets.image[index], b.op("Gather", rounds, keep), targets.y[index], targets.x[index])
    seeds = {}
    for name in scale.boundaries:
        dy = gradient_of(b, tail, name)  # [N, R, C, h, w]
        if dy is not None:
            seeds[names[name]] = [_pixel_gradient(b, dy, where, name)]
    wanted = b.wanted
    b.wanted = differentiable(copies, {names[layer] for layer in layers}, b.types)
    grads = backward(b, copies, seeds)
    b.wanted = wanted
    found = []
    for layer in layers:
        window = scale.window[layer]
        grad = gradient_of(b, grads, names[layer])  # [M, 1, C, ny, nx]
        if grad is None:
            grad = _window_zeros(b, layer, b.op("Shape", keep), window)
        mask = windows.mask(index, layer, window)
        if mask is not None:  # (cells outside the map are the zeros of the padding, not the layer's)
            grad = b.op("Mul", grad, b.unsqueeze(mask, [1]))
        summed = b.reduce("ReduceSum", grad, SPATIAL, keepdims=0)  # [M, 1, C]
        found.append((_to_rows(b, summed, keep, targets.rows, layer), b.op("Identity", grad)))
    _materialise(b, index, windows, virtual, holds, start)
    return found


def _zeros_like_rows(b: Builder, layer: str, rows: str, window: Window) -> tuple[str, str]:
    """Zeros ``[rows, 1, C]`` and ``[0, 1, C, ny, nx]``: what a scale without targets gives ``layer``."""
    channels = b.shape(layer)[1]
    summed = b.zeros(b.op("Concat", rows, b.ints([1, channels]), axis=0), like=layer)
    return summed, _window_zeros(b, layer, b.ints([0]), window)


def _window_zeros(b: Builder, layer: str, rows: str, window: Window) -> str:
    """Zero window gradients ``[rows, 1, C, ny, nx]`` of ``layer``."""
    dims = b.ints([1, b.shape(layer)[1], window[0][2], window[1][2]])
    return b.zeros(b.op("Concat", rows, dims, axis=0), like=layer)


def _pixel_gradient(b: Builder, dy: str, where: tuple[str, str, str, str], boundary: str) -> str:
    """``dy[image, round, :, y, x]`` of the tail's gradient ``[N, R, C, h, w]`` at ``where`` (``[M]`` each) as the
    seed ``[M, 1, C, 1, 1]`` of the windowed ``boundary``."""
    channels, h, w = b.shape(boundary)[1:]
    image, round_, y, x = where
    rounds = b.op("Squeeze", b.dims(dy, 1, 2), b.ints([0]))
    first = b.op(
        "Mul", b.op("Add", b.op("Mul", image, rounds), round_), channels * h * w
    )
    first = b.op("Add", first, b.op("Add", b.op("Mul", y, w), x))
    index = b.op("Add", b.unsqueeze(first, [1]), b.const(np.arange(channels, dtype=np.int64)[None] * h * w))
    pixel = b.op("Gather", b.op("Reshape", dy, b.ints([-1])), index, axis=0)  # [M, C]
    return b.op("Reshape", pixel, b.op("Concat", b.dims(pixel, 0, 1), b.ints([1, channels, 1, 1]), axis=0))


def _to_rows(b: Builder, x: str, keep: str, rows: str, like: str) -> str:
    """``x`` ``[M, ...]``, the target rows ``keep``, placed among zeros ``[N * T, ...]`` (``like``'s type)."""
    canvas = b.zeros(b.op("Concat", rows, b.dims(x, 1), axis=0), like=like)
    return b.op("ScatterND", canvas, b.unsqueeze(keep, [1]), x)
