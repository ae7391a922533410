"""Target-layer layouts: which axes of a tensor are the channels and the spatial grid, and the adapters
that turn it into the contract's ``[N, C, h, w]`` inside the graph.

A layout is data (:class:`Layout`): its kind names one entry of :data:`ADAPTERS`, and the grid
``(h, w)`` and prefix token count P come from the graph, never from a square root alone:

========  ===================  ===============================================================
kind      tensor               to the contract
========  ===================  ===============================================================
nchw      ``[N, C, h, w]``     as it is (CNNs)
nhwc      ``[N, h, w, C]``     Transpose (Keras, Swin stages, ConvNeXt blocks)
tokens    ``[N, P + h*w + S, D]``  drop the P prefix tokens (class, distillation, registers) and
                               the S suffix tokens (YOLOS's detection tokens), Reshape to
                               ``[N, h, w, D]``, Transpose (ViT, DeiT)
========  ===================  ===============================================================

The adapters are linear selections and permutations, so the same adapter turns the gradient of
the layer (``[N, T, ...]``, one more leading axis) into the gradient of the contract's
activations: the gradient of the prefix tokens is dropped, as pytorch-grad-cam's
``reshape_transform`` does. :func:`infer_layouts` finds each tensor's layout from the graph: grids
are the spatial sizes of tensors that convolutions and pools produce (a ViT's patch embedding
gives ``H/p x W/p``), and halvings of them (Swin's patch merging, LeViT's subsampling), upstream of the
tensor. A token layer is ``[N, L, D]`` with a width ``D`` above 1; where the graph concatenates the grid's tokens
with others (the class token before them, YOLOS's detection tokens after), that Concat says which go where; other
token counts are grids alone (YOLOS's 10 detection tokens are no 2x2 grid and 6 prefixes, a detector's 7 flattened
output channels no 2x2 grid and 3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcam_export.builder import Builder
from onnxcam_export.ops import ops_with
from onnxcam_export.vjp import attrs

GRID_OPS = ops_with("grid")  # NCHW out
TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]

Shapes = dict[str, list[int | str | None]]


@dataclass(frozen=True)
class Layout:
    """Where the channels and the ``h x w`` grid of a target layer are; ``prefix``/``suffix``: tokens before and
    after the grid."""

    kind: str
    grid: tuple[int, int]
    prefix: int = 0
    suffix: int = 0  # tokens after the grid (YOLOS's detection tokens)

    @property
    def channels_first(self) -> bool:
        """``[N, C, h, w]``, the contract's own layout: nothing to adapt."""
        return self.kind == "nchw"

    @property
    def has_tokens(self) -> bool:
        """A transformer's ``[N, P + h*w, C]`` tokens (``prefix`` P of them before the grid)."""
        return self.kind == "tokens"

    @property
    def adapter(self) -> LayoutKind:
        """The nodes that turn this layout into the contract's and back (:data:`ADAPTERS`)."""
        return ADAPTERS[self.kind]

    def contract_dims(self, shape: list[int]) -> list[int]:
        """``[C, h, w]`` of the contract's activations for a layer of static shape ``shape``."""
        channels = shape[1] if self.kind == "nchw" else shape[-1]
        return [channels, *self.grid]

    def describe(self, shape: list[int]) -> str:
        """What the layer is, for the user: ``token layer: 1 + 196 tokens of 384, 14x14 grid, class token dropped``."""
        h, w = self.grid
        if self.kind == "tokens":
            dropped = {0: "no prefix token", 1: "class token dropped"}.get(
                self.prefix, f"{self.prefix} prefix tokens dropped"
            )
            if self.suffix:
                return (f"token layer: {self.prefix} + {h * w} + {self.suffix} tokens of {shape[-1]}, {h}x{w} grid, "
                        f"{self.prefix} prefix and {self.suffix} suffix tokens dropped")  # fmt: skip
            return f"token layer: {self.prefix} + {h * w} tokens of {shape[-1]}, {h}x{w} grid, {dropped}"
        order = "channels-last" if self.kind == "nhwc" else "channels-first"
        return f"{order} layer: {h}x{w} grid of {self.contract_dims(shape)[0]} channels"


# -- adapters: lead = the leading axes kept in front (1: [N, ...] forward, 2: [N, T, ...] gradients) --------
def _nchw(b: Builder, x: str, layout: Layout, lead: int) -> str:
    return x


def _nhwc(b: Builder, x: str, layout: Layout, lead: int) -> str:
    return b.op("Transpose", x, perm=[*range(lead), lead + 2, lead, lead + 1])


def _tokens(b: Builder, x: str, layout: Layout, lead: int) -> str:
    if layout.prefix or layout.suffix:
        end = layout.prefix + layout.grid[0] * layout.grid[1] if layout.suffix else np.iinfo(np.int64).max
        x = b.op("Slice", x, b.ints([layout.prefix]), b.ints([end]), b.ints([lead]))
    grid = b.op("Concat", b.dims(x, 0, lead), b.ints(list(layout.grid)), b.dims(x, lead + 1), axis=0)
    return b.op("Transpose", b.op("Reshape", x, grid), perm=[*range(lead), lead + 2, lead, lead + 1])


Adapter = Callable[[Builder, str, Layout, int], str]


@dataclass(frozen=True)
class LayoutKind:
    """``to_contract(b, x, layout, lead)``, and ``from_contract`` for the head-only copy (None: it needs
    tokens that the contract's activations do not hold)."""

    to_contract: Adapter
    from_contract: Callable[[Builder, str, Layout], str | None]


def _tokens_back(b: Builder, x: str, layout: Layout) -> str | None:
    if layout.prefix or layout.suffix:
        return None
    h, w = layout.grid
    channels_last = b.op("Transpose", x, perm=TO_NHWC)
    return b.op("Reshape", channels_last, b.op("Concat", b.dims(x, 0, 1), b.ints([h * w]), b.dims(x, 1, 2), axis=0))


ADAPTERS: dict[str, LayoutKind] = {
    "nchw": LayoutKind(_nchw, lambda b, x, layout: x),
    "nhwc": LayoutKind(_nhwc, lambda b, x, layout: b.op("Transpose", x, perm=TO_NHWC)),
    "tokens": LayoutKind(_tokens, _tokens_back),
}


# -- inference: which tensors are grids, in which layout ------------------------------------------------------
def _transposed(tag: str, node: onnx.NodeProto) -> str | None:
    perm = list(attrs(node).get("perm", []))
    return {("nchw", tuple(TO_NHWC)): "nhwc", ("nhwc", tuple(TO_NCHW)): "nchw"}.get((tag, tuple(perm)))


def _spatial(shape: list, tag: str) -> tuple:
    return tuple(shape[2:4]) if tag == "nchw" else tuple(shape[1:3])


def _grid_tags(graph: onnx.GraphProto, shapes: Shapes, image: str, image_tag: str) -> dict[str, str]:
    """``nchw``/``nhwc`` for every 4-D tensor whose layout follows from the graph: the image input, the
    outputs of convolutions and pools, their layout transposes, and outputs with the same rank and
    spatial sizes as a tagged input (elementwise ops, norms, matmuls over the channels)."""
    tags = {image: image_tag}
    for node in graph.node:
        tagged = [(i, tags[i]) for i in node.input if i in tags]
        for out in node.output:
            shape = shapes.get(out)
            if not out or not shape or len(shape) != 4:
                continue
            if node.op_type in GRID_OPS:
                tags[out] = "nchw"
            elif node.op_type == "Transpose" and tagged:
                tag = _transposed(tagged[0][1], node)
                if tag:
                    tags[out] = tag
            else:
                same = [t for i, t in tagged if _spatial(shapes.get(i) or [], t) == _spatial(shape, t)]
                if same:
                    tags[out] = same[0]
    return tags


def _sized(grids: set[tuple]) -> set[tuple[int, int]]:
    """The grids of static sides of at least 2."""
    return {(h, w) for h, w in grids if isinstance(h, int) and isinstance(w, int) and h >= 2 and w >= 2}


def _halvings(grids: set[tuple]) -> set[tuple[int, int]]:
    """``grids`` (h, w >= 2) and their halvings, each side rounded up (Swin's patch merging halves even sides;
    LeViT's subsampling, a slice of step 2, takes 4 of 7)."""
    found = _sized(grids)
    for h, w in list(found):
        while h > 2 and w > 2:
            h, w = -(-h // 2), -(-w // 2)
            found.add((h, w))
    return found


def _upstream_grids(
    graph: onnx.GraphProto, tags: dict[str, str], shapes: Shapes, halved: bool = True
) -> dict[str, frozenset]:
    """Per tensor, the grids (the tagged tensors' spatial sizes, with their :func:`_halvings` where ``halved``)
    the graph produced before it: a token tensor's grid must be one of them."""
    own = {t: frozenset(_halvings({_spatial(shapes[t], tag)}) if halved else _sized({_spatial(shapes[t], tag)}))
           for t, tag in tags.items()}  # fmt: skip
    seen: dict[str, frozenset] = dict(own)
    for node in graph.node:
        before = frozenset().union(*[seen.get(i, frozenset()) for i in node.input])
        for out in node.output:
            seen[out] = before | own.get(out, frozenset())
    return seen


def _flattened_grids(graph: onnx.GraphProto, tags: dict[str, str], shapes: Shapes) -> set[str]:
    """The ``[N, C, h*w]`` reshapes of ``[N, C, h, w]`` grids: channels first, not tokens (a ViT's patch
    embedding before its transpose, a CNN's ``flatten(2)`` before a 1-D pool), whatever their sizes."""
    found = set()
    for node in graph.node:
        source = shapes.get(node.input[0]) if node.input else None
        if node.op_type in ("Flatten", "Reshape") and tags.get(node.input[0]) == "nchw" and source:
            shape = shapes.get(node.output[0]) or []
            if len(shape) == 3 and shape[1] == source[1] and shape[2] == source[2] * source[3]:
                found.add(node.output[0])
    return found


def _token_splits(graph: onnx.GraphProto, shapes: Shapes, upstream: dict[str, frozenset]) -> dict[int, tuple]:
    """Token count -> (prefix, suffix, grid) where a Concat over the tokens joins a grid's h*w tokens with
    others: the class token before them (ViT), YOLOS's detection tokens after. The grid is one a convolution or
    pool made upstream (a patch embedding's), not a halving: a detector's [N, 4, A] boxes joined to its class
    scores are no 2x2 grid."""
    splits = {}
    for node in graph.node:
        shape = shapes.get(node.output[0]) or []
        if node.op_type != "Concat" or len(shape) != 3 or int(attrs(node).get("axis", 0)) % 3 != 1:
            continue
        counts = [(shapes.get(i) or [None, None])[1] for i in node.input]
        if not all(isinstance(c, int) for c in counts):
            continue
        for i, count in enumerate(counts):
            grid = next((g for g in upstream.get(node.input[i], ()) if g[0] * g[1] == count), None)
            if grid is not None and len(counts) > 1:
                splits.setdefault(sum(counts), (sum(counts[:i]), sum(counts[i + 1 :]), grid))
                break
    return splits


def _token_layout(shape: list[int], grids: frozenset, splits: dict[int, tuple]) -> Layout | None:
    tokens, width = shape[1], shape[2]
    if width <= 1:  # (a pooled [N, C, 1] is no token layer)
        return None
    if tokens in splits and splits[tokens][2] in grids:
        prefix, suffix, grid = splits[tokens]
        return Layout("tokens", grid, prefix, suffix)
    for h, w in sorted(grids, key=lambda g: (-g[0] * g[1], g)):  # tokens beside the grid only where joined to it
        if tokens == h * w:
            return Layout("tokens", (h, w))
    return None


def infer_layouts(
    graph: onnx.GraphProto, shapes: Shapes, image: str, channels_first: bool, batch: int | str | None
) -> dict[str, Layout]:
    """The layout of every tensor with a spatial grid of at least 2 x 2 and the batch on axis 0.

    ``image``: the model's float image input, ``channels_first`` its layout; ``batch``: its batch dim.
    """
    tags = _grid_tags(graph, shapes, image, "nchw" if channels_first else "nhwc")
    grids = _halvings({_spatial(shapes[t], tag) for t, tag in tags.items()})
    upstream = _upstream_grids(graph, tags, shapes)
    splits = _token_splits(graph, shapes, _upstream_grids(graph, tags, shapes, halved=False))
    flattened = _flattened_grids(graph, tags, shapes)
    layouts = {}
    for name, shape in shapes.items():
        batched = shape and (shape[0] == batch or not isinstance(shape[0], int))  # symbolic: a reshape's -1
        if not batched or not all(isinstance(d, int) for d in shape[1:]) or name in flattened:
            continue
        layout = None
        if len(shape) == 4:
            tag = tags.get(name) or next((t for t in ("nchw", "nhwc") if _spatial(shape, t) in grids), None)
            layout = Layout(tag, _spatial(shape, tag)) if tag else None
        elif len(shape) == 3:
            layout = _token_layout(shape, upstream.get(name, frozenset()), splits)
        if layout is not None and min(layout.grid) >= 2:
            layouts[name] = layout
    return layouts
