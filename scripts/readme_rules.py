"""Rewrite the README's paragraph on the gradient rules from the tables themselves: the rules (``vjp.RULES``)
and the flat ops (``ops.ops_with("flat")``), which ``tests/test_readme.py`` checks. Run it after adding a rule:
``.venv/bin/python scripts/readme_rules.py``."""

from __future__ import annotations

import textwrap
from pathlib import Path

from onnxcam_export.ops import ops_with
from onnxcam_export.vjp import RULES

README = Path(__file__).parents[1] / "README.md"
START, END = "   the nodes between the target layer and the logits, newest first, and applies one", "`--layer`.\n"


def listing(ops: object, tag: str) -> str:
    """The ops, sorted and backticked, between the ``<!-- tag -->`` markers (NUL keeps a marker on one line)."""
    return f"<!--\0{tag}\0-->" + ", ".join(f"`{o}`" for o in sorted(ops)) + f"<!--\0/{tag}\0-->"


PROSE = (f"the nodes between the target layer and the logits, newest first, and applies one vector-Jacobian rule "
        "per ONNX op type, each a function in `export/vjp.py` with its math above it and a torch-autograd row in "
        "`tests/test_vjp_rules.py` (float64 to 1e-10; ONNX Runtime's float32-only kernels to 1e-5). Among them: "
        "Conv (any `auto_pad`) and ConvTranspose (groups, strides, pads, `output_padding`, dilations); the pools "
        "(MaxPool via its `Indices` output; AveragePool and LpPool with `ceil_mode` and kernels larger than the "
        "map, as Hugging Face's EfficientNet pooler has); every Reduce* (ties of ReduceMax and ReduceMin share the "
        "gradient, as torch's `amax`; ReduceProd exact with zeros); Batch, Layer, Instance, Group and Lp "
        "normalisation; MatMul and Einsum with either or both operands variable (attention's `q @ kᵀ` and "
        "`A @ v`); Resize and Upsample (nearest, linear and cubic; half_pixel, pytorch_half_pixel, align_corners "
        "and asymmetric coordinates); Pad (constant, reflect, edge, wrap, negative pads); Slice with any step, "
        "negative ones too; GridSample (deformable attention: the values and the sampling grid); Gather, "
        "GatherElements, GatherND, ScatterElements, ScatterND, TopK's values, CumSum, "
        "Tile, DepthToSpace and SpaceToDepth; QuantizeLinear/DequantizeLinear (straight-through: the dequantized "
        "value passes the gradient where its level is not saturated, as torch's fake-quantize). The table holds "
        f"exactly these {len(RULES)} ops (`tests/test_readme.py` checks this list against `RULES`): "
        + listing(RULES, "rules") + ". Ops may move the batch off axis 0 (timm's `permute(2, 0, 3, 1, 4)` of q, "
        "k, v). Gradients that reach a tensor along several paths are summed, and only tensors on a float path "
        "from the target layer to the logits get one. No gradient passes, so no rule is asked for: integer "
        "tensors (shapes, indices, masks) and what is computed from them; paths that reach the scores only "
        "through indices (RT-DETR's ReduceMax and TopK that pick its queries, an ArgMax); and the ops whose "
        "derivative is zero almost everywhere, " + listing(ops_with("flat"), "flat") + ". Only default-domain ONNX "
        "ops are emitted, so the file runs on any ONNX runtime. Refused, with the op, the node and the list of "
        "supported ops: any other op on a float path, ops of other domains (`com.microsoft`), and control flow "
        "(`If`, `Loop`, `Scan`), whose bodies the walker does not differentiate: pick a layer after them with "
        "`--layer`.")


def main() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index(START)
    end = text.index(END, start) + len(END)
    body = textwrap.fill(PROSE, width=113, initial_indent="   ", subsequent_indent="   ", break_on_hyphens=False,
                         break_long_words=False).replace("\0", " ")
    README.write_text(text[:start] + body + "\n" + text[end:], encoding="utf-8")


if __name__ == "__main__":
    main()
