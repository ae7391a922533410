"""Each VJP rule against torch autograd: one row per (op, shapes, attributes) case.

A row builds a one-node ONNX graph, lets the rule emit its backward nodes, runs both in
ONNX Runtime and compares the input gradient with ``torch.autograd.grad`` for every one of
T = 3 upstream gradients. Rows run in float64 (tolerance 1e-10) except where ONNX
Runtime's CPU kernels exist for float32 only (AveragePool/ConvTranspose: 1e-5).

A second table holds the node forms the rules refuse, one row per refusal in ``vjp.py``
with a phrase of its message; the walker's own messages close the file.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")
F = torch.nn.functional

from onnxcam_export import vjp  # noqa: E402
from onnxcam_export.builder import Builder  # noqa: E402
from onnxcam_export.graft import graft  # noqa: E402
from onnxcam_export.vjp import RULES, Rule, UnsupportedOp  # noqa: E402
from onnxcam_export.walk import input_gradients  # noqa: E402

TARGETS = 3


@dataclass
class Case:
    op: str
    shape: list[int]
    torch_fn: Callable
    attrs: dict = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)  # extra node inputs, in order
    dtype: type = np.float64
    tol: float = 1e-10
    seed: int = 0
    extra: list[list[int]] = field(default_factory=list)  # more differentiable inputs, after x
    outputs: int = 1
    no_grad: tuple[int, ...] = ()  # outputs that receive no upstream gradient
    opset: int = 18
    positive: bool = False  # inputs drawn from [0.5, 2.5) instead of a standard normal
    fed: tuple[str, ...] = ()  # constants fed at run time instead (indices computed by the graph)
    leading: dict[str, np.ndarray] = field(default_factory=dict)  # constant inputs before x (Where's condition)
    x_dtype: type | None = None  # the differentiable inputs' type where it is not ``dtype`` (integer levels)
    spread: float = 1.0  # the inputs' standard deviation
    order: tuple[str, ...] = ()  # the node's inputs in this order where the data inputs are not first (x0, i, x1)
    prepare: Callable[[list[np.ndarray]], None] | None = None  # edits the drawn inputs in place (ties, zeros)

    @property
    def id(self) -> str:
        extras = ",".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{self.op}{[self.shape, *self.extra]}[{extras}]@{self.opset}"


def _c(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def _same_avg_pool(x: torch.Tensor, pads: tuple[int, ...], count_include_pad: bool) -> torch.Tensor:
    """3x3 / stride 2 average over ``x`` zero-padded by ``pads`` (F.pad order), dividing by the
    window size, or by the number of real cells in it."""
    total = F.avg_pool2d(F.pad(x, pads), 3, 2)
    return total if count_include_pad else total / F.avg_pool2d(F.pad(torch.ones_like(x), pads), 3, 2)


RNG = np.random.default_rng(1234)
W85, W58, BIAS5 = RNG.standard_normal((8, 5)), RNG.standard_normal((5, 8)), RNG.standard_normal(5)
BN = [RNG.standard_normal(3), RNG.standard_normal(3), RNG.standard_normal(3), RNG.uniform(0.5, 2, 3)]
W85_T, W58_T, BIAS5_T = (torch.from_numpy(v) for v in (W85, W58, BIAS5))
LN, LN4 = RNG.standard_normal((2, 8)), RNG.standard_normal((4, 3, 3))
COND = RNG.random((2, 3, 4)) > 0.5
FLAT_INDICES = np.asarray([[3, 0, 3], [11, -1, 5]])
CONV_W, CONV_B, CONV_WG, CONV_DW, CONV_W4 = (
    torch.from_numpy(RNG.standard_normal(shape))
    for shape in [(6, 4, 3, 3), (6,), (6, 2, 3, 3), (4, 1, 3, 3), (5, 4, 4, 4)]
)

# fmt: off
CASES = [
    Case("Relu", [2, 3, 4, 5], F.relu),
    Case("LeakyRelu", [2, 3, 4], lambda x: F.leaky_relu(x, 0.125), {"alpha": 0.125}),
    Case("Clip", [2, 3, 4], lambda x: torch.clamp(x, -0.25, 0.5), {"min": -0.25, "max": 0.5}, opset=9,
         dtype=np.float32, tol=1e-5),
    Case("Sigmoid", [2, 3, 4, 5], torch.sigmoid),
    Case("HardSigmoid", [2, 3, 4], lambda x: torch.clamp(0.25 * x + 0.5, 0, 1), {"alpha": 0.25}),
    Case("HardSigmoid", [2, 3, 4], lambda x: torch.clamp(0.5 * x - 0.25, 0, 1), {"alpha": 0.5, "beta": -0.25}),
    Case("HardSwish", [2, 3, 4, 5], F.hardswish, dtype=np.float32, tol=1e-5),  # ORT: 1/6 as float32 in double
    Case("Sqrt", [2, 3, 4], torch.sqrt, positive=True),
    Case("Erf", [2, 3, 4], torch.erf, dtype=np.float32, tol=1e-5),
    Case("Gelu", [2, 3, 4], F.gelu, opset=20, dtype=np.float32, tol=1e-5),
    Case("Gelu", [2, 3, 4], lambda x: F.gelu(x, approximate="tanh"), {"approximate": "tanh"}, opset=20,
         dtype=np.float32, tol=1e-5),
    Case("Pow", [2, 3, 4], lambda x: x**3, constants={"p": _c(3.0)}),
    Case("Pow", [2, 3, 4], lambda x: x**0.5, constants={"p": _c(0.5)}, positive=True),
    Case("Cast", [2, 3, 4], lambda x: x.float(), {"to": onnx.TensorProto.FLOAT}, tol=1e-6),
    Case("Add", [2, 3, 4, 5], lambda x, z: x + z, extra=[[2, 3, 4, 5]]),
    Case("Add", [2, 3, 4, 5], lambda x, z: x + z, extra=[[2, 3, 1, 1]]),
    Case("Add", [2, 3, 4, 5], lambda x: x + torch.from_numpy(BIAS5), constants={"b": BIAS5}),
    Case("Sum", [2, 3, 4, 5], lambda x, z, w: x + z + w, extra=[[2, 3, 4, 5], [2, 1, 4, 5]]),
    Case("Sub", [2, 3, 4, 5], lambda x, z: x - z, extra=[[2, 3, 1, 5]]),
    Case("Mul", [2, 3, 4, 5], lambda x, z: x * z, extra=[[2, 3, 1, 1]]),
    Case("Mul", [2, 3, 4, 5], lambda x: x * torch.from_numpy(BIAS5), constants={"b": BIAS5}),
    Case("Div", [2, 3, 4, 5], lambda x, z: x / z, extra=[[2, 3, 1, 1]], positive=True),
    Case("Div", [2, 5], lambda x: x / torch.from_numpy(BIAS5), constants={"b": BIAS5}),
    Case("Squeeze", [2, 3, 1, 1], lambda x: x.squeeze((2, 3)), constants={"axes": np.asarray([2, 3])}),
    Case("Squeeze", [2, 3, 1, 1], lambda x: x.squeeze((2, 3)), {"axes": [2, 3]}, opset=11),
    Case("Unsqueeze", [2, 3], lambda x: x[:, :, None, None], constants={"axes": np.asarray([-1, 2])}),
    Case("Unsqueeze", [2, 3], lambda x: x[:, None], {"axes": [1]}, opset=11),
    Case("Transpose", [2, 3, 4, 5], lambda x: x.permute(0, 2, 3, 1), {"perm": [0, 2, 3, 1]}),
    Case("Transpose", [2, 3, 4], lambda x: x.permute(0, 2, 1), {"perm": [0, 2, 1]}),
    Case("Concat", [2, 3, 4, 4], lambda x, z: torch.cat([x, z], 1), {"axis": 1}, extra=[[2, 5, 4, 4]]),
    Case("Concat", [2, 3, 4], lambda x, z, w: torch.cat([x, z, w], -1), {"axis": -1}, extra=[[2, 3, 2], [2, 3, 1]]),
    Case("Split", [2, 6, 4], lambda x: torch.split(x, [1, 2, 3], 1), {"axis": 1}, outputs=3,
         constants={"split": np.asarray([1, 2, 3])}),
    Case("Split", [2, 6, 4], lambda x: torch.split(x, [2, 4], 1), {"axis": 1, "split": [2, 4]}, outputs=2,
         no_grad=(1,), opset=11),
    Case("Slice", [2, 6, 5], lambda x: x[:, 1:-1, 2:], constants={"starts": np.asarray([1, 2]),
         "ends": np.asarray([-1, 100]), "axes": np.asarray([1, 2])}),
    Case("Slice", [2, 6, 5], lambda x: x[:, :, 1:3], {"starts": [1], "ends": [3], "axes": [2]}, opset=9),
    Case("Pad", [2, 3, 4], lambda x: F.pad(x, (2, 1, 1, 0)), constants={"pads": np.asarray([0, 1, 2, 0, 0, 1])}),
    Case("Gather", [2, 5, 3], lambda x: x[:, [4, 0, 4]], {"axis": 1}, constants={"i": np.asarray([4, 0, 4])}),
    Case("Gather", [2, 5, 3], lambda x: x[:, 2], {"axis": 1}, constants={"i": np.asarray(2)}),
    Case("Gather", [2, 3, 5], lambda x: x[:, :, [[1, 2], [0, -1]]], {"axis": 2},
         constants={"i": np.asarray([[1, 2], [0, -1]])}),
    Case("Softmax", [2, 7], lambda x: torch.softmax(x, 1), {"axis": 1}),
    Case("Softmax", [2, 3, 4], lambda x: torch.softmax(x.flatten(1), 1).reshape(2, 3, 4), {"axis": 1}, opset=11),
    Case("LogSoftmax", [2, 3, 4], lambda x: torch.log_softmax(x, -1), {"axis": -1}),
    Case("LayerNormalization", [2, 3, 8],
         lambda x: F.layer_norm(x, (8,), torch.from_numpy(LN[0]), torch.from_numpy(LN[1]), eps=1e-5),
         constants={"scale": LN[0], "B": LN[1]}, opset=17),
    Case("LayerNormalization", [2, 4, 3, 3],
         lambda x: F.layer_norm(x, (4, 3, 3), torch.from_numpy(LN4), None, eps=1e-3),
         {"axis": 1, "epsilon": 1e-3}, constants={"scale": LN4}, opset=17),
    Case("Clip", [2, 3, 4, 4], lambda x: torch.clamp(x, -0.5, 0.7), constants={"min": _c(-0.5), "max": _c(0.7)}),
    Case("Clip", [2, 6], lambda x: torch.clamp(x, max=0.3), constants={"": None, "max": _c(0.3)}),
    Case("Identity", [2, 3, 4], lambda x: x),
    Case("Dropout", [2, 7], lambda x: x),
    Case("Flatten", [2, 3, 4, 5], lambda x: x.flatten(1), {"axis": 1}),
    Case("Flatten", [2, 6], lambda x: x, {"axis": 1}),
    Case("Flatten", [2, 3, 4], lambda x: x.flatten(1), {"axis": -2}),
    Case("Reshape", [2, 3, 4, 5], lambda x: x.reshape(2, 12, 5), constants={"shape": np.asarray([2, 12, 5])}),
    Case("Reshape", [2, 3, 4, 5], lambda x: x.reshape(2, -1), constants={"shape": np.asarray([0, -1])}),
    Case("Gemm", [2, 8], lambda x: x @ W85_T + BIAS5_T, constants={"B": W85, "C": BIAS5}),
    Case("Gemm", [2, 8], lambda x: 0.5 * x @ W58_T.T + 2 * BIAS5_T, {"transB": 1, "alpha": 0.5, "beta": 2.0},
         constants={"B": W58, "C": BIAS5}),
    Case("Gemm", [3, 8], lambda x: -1.5 * x @ W85_T, {"alpha": -1.5}, constants={"B": W85}),
    Case("MatMul", [2, 8], lambda x: x @ W85_T, constants={"B": W85}),
    Case("MatMul", [2, 3, 8], lambda x: x @ W85_T, constants={"B": W85}),
    Case("MaxPool", [2, 3, 8, 8], lambda x: F.max_pool2d(x, 2, 2), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    Case("MaxPool", [2, 3, 9, 9], lambda x: F.max_pool2d(x, 3, 2, padding=1),
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    Case("MaxPool", [1, 2, 6, 7], lambda x: F.max_pool2d(x, 3, 1, padding=1),
         {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    Case("MaxPool", [2, 2, 7, 7], lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True),
         {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    Case("AveragePool", [2, 3, 8, 8], lambda x: F.avg_pool2d(x, 2, 2), {"kernel_shape": [2, 2], "strides": [2, 2]},
         dtype=np.float32, tol=1e-5),
    Case("AveragePool", [2, 3, 9, 9], lambda x: F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False),
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, dtype=np.float32, tol=1e-5),
    Case("AveragePool", [2, 3, 9, 9], lambda x: F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=True),
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
         dtype=np.float32, tol=1e-5),
    Case("AveragePool", [2, 3, 7, 7], lambda x: F.avg_pool2d(x, 2, 2), {"kernel_shape": [2, 2], "strides": [2, 2]},
         dtype=np.float32, tol=1e-5),  # last row/column is never pooled
    Case("AveragePool", [2, 3, 7, 7], lambda x: x, {"kernel_shape": [1, 1]}, dtype=np.float32, tol=1e-5),
    Case("AveragePool", [2, 3, 8, 8], lambda x: _same_avg_pool(x, (0, 1, 0, 1), count_include_pad=False),
         {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, dtype=np.float32, tol=1e-5),
    Case("AveragePool", [2, 3, 8, 8], lambda x: _same_avg_pool(x, (1, 0, 1, 0), count_include_pad=True),
         {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER", "count_include_pad": 1},
         dtype=np.float32, tol=1e-5),
    # straight-through quantization (torch's fake-quantize backward: zero where the level saturates)
    Case("QuantizeLinear", [2, 3, 4, 5], lambda x: torch.fake_quantize_per_tensor_affine(x, 0.02, 100, 0, 255) / 0.02
         + 100, constants={"s": np.asarray(0.02, np.float32), "z": np.asarray(100, np.uint8)}, dtype=np.float32,
         tol=1e-4, spread=2.0),
    Case("QuantizeLinear", [2, 3, 4], lambda x: torch.fake_quantize_per_channel_affine(
         x, torch.tensor([0.01, 0.02, 0.05]), torch.tensor([0, 5, -3], dtype=torch.int32), 1, -128, 127)
         / torch.tensor([0.01, 0.02, 0.05])[:, None] + torch.tensor([0.0, 5, -3])[:, None],
         constants={"s": np.asarray([0.01, 0.02, 0.05], np.float32), "z": np.asarray([0, 5, -3], np.int8)},
         dtype=np.float32, tol=1e-4, spread=2.0),
    Case("QuantizeLinear", [2, 6], lambda x: torch.fake_quantize_per_tensor_affine(x, 0.01, 0, 0, 255) / 0.01,
         constants={"s": np.asarray(0.01, np.float32)}, dtype=np.float32, tol=1e-4),  # no zero point: uint8, 0
    Case("DequantizeLinear", [2, 3, 4, 5], lambda x: (x - 100) * 0.02,
         constants={"s": np.asarray(0.02, np.float32), "z": np.asarray(100, np.uint8)}, x_dtype=np.uint8,
         dtype=np.float32, tol=1e-6, spread=100.0),
    Case("DequantizeLinear", [2, 3, 4], lambda x: (x - torch.tensor([0.0, 5, -3])[:, None])
         * torch.tensor([0.01, 0.02, 0.05])[:, None], {"axis": 1},
         constants={"s": np.asarray([0.01, 0.02, 0.05], np.float32), "z": np.asarray([0, 5, -3], np.int8)},
         x_dtype=np.int8, dtype=np.float32, tol=1e-6, spread=50.0),
    Case("Conv", [2, 4, 7, 7], lambda x: F.conv2d(x, CONV_W), constants={"W": CONV_W.numpy()},
         dtype=np.float32, tol=1e-5),
    Case("Conv", [2, 4, 9, 8], lambda x: F.conv2d(x, CONV_W, CONV_B, stride=2, padding=1),
         {"strides": [2, 2], "pads": [1, 1, 1, 1]}, constants={"W": CONV_W.numpy(), "B": CONV_B.numpy()},
         dtype=np.float32, tol=1e-5),
    Case("Conv", [2, 4, 10, 10], lambda x: F.conv2d(x, CONV_WG, stride=3, dilation=2, groups=2),
         {"strides": [3, 3], "dilations": [2, 2], "group": 2}, constants={"W": CONV_WG.numpy()},
         dtype=np.float32, tol=1e-5),
    Case("Conv", [2, 4, 6, 6], lambda x: F.conv2d(F.pad(x, (0, 1, 0, 1)), CONV_DW, stride=2, groups=4),
         {"strides": [2, 2], "auto_pad": "SAME_UPPER", "group": 4}, constants={"W": CONV_DW.numpy()},
         dtype=np.float32, tol=1e-5),
    Case("Conv", [2, 4, 5, 5], lambda x: F.conv2d(F.pad(x, (2, 1, 2, 1)), CONV_W4, stride=2),
         {"strides": [2, 2], "auto_pad": "SAME_LOWER"}, constants={"W": CONV_W4.numpy()},
         dtype=np.float32, tol=1e-5),
    # stride 1: the backward is a Conv with the kernel flipped and each group's channels swapped
    Case("Conv", [2, 4, 10, 9], lambda x: F.conv2d(F.pad(x, (1, 2, 2, 0)), CONV_WG, dilation=2, groups=2),
         {"dilations": [2, 2], "group": 2, "pads": [2, 1, 0, 2]}, constants={"W": CONV_WG.numpy()},
         dtype=np.float32, tol=1e-5),
    Case("Conv", [2, 4, 6, 7], lambda x: F.conv2d(x, CONV_DW, padding=1, groups=4),
         {"group": 4, "pads": [1, 1, 1, 1]}, constants={"W": CONV_DW.numpy()}, dtype=np.float32, tol=1e-5),
    Case("Conv", [2, 4, 5, 5], lambda x: F.conv2d(x, CONV_W, padding=4),  # (pads past the kernel: ConvTranspose)
         {"pads": [4, 4, 4, 4]}, constants={"W": CONV_W.numpy()}, dtype=np.float32, tol=1e-5),
    Case("GlobalAveragePool", [2, 3, 4, 5], lambda x: x.mean((2, 3), keepdim=True), dtype=np.float32, tol=1e-5),
    Case("ReduceMean", [2, 3, 4, 5], lambda x: x.mean((2, 3)), {"keepdims": 0}, constants={"axes": np.asarray([2, 3])}),
    Case("ReduceMean", [2, 3, 4, 5], lambda x: x.mean(-1, keepdim=True), constants={"axes": np.asarray([-1])}),
    Case("Tanh", [2, 3, 4], torch.tanh),
    Case("Abs", [2, 3, 4], torch.abs),
    Case("Log", [2, 3, 4], torch.log, positive=True),
    Case("Reciprocal", [2, 3, 4], torch.reciprocal, positive=True),
    Case("Sin", [2, 3, 4], torch.sin),
    Case("Cos", [2, 3, 4], torch.cos),
    Case("Softplus", [2, 3, 4], F.softplus, dtype=np.float32, tol=1e-5),
    Case("Softsign", [2, 3, 4], F.softsign, dtype=np.float32, tol=1e-5),
    Case("Elu", [2, 3, 4], lambda x: F.elu(x, 0.5), {"alpha": 0.5}, dtype=np.float32, tol=1e-5),
    Case("Selu", [2, 3, 4], F.selu, dtype=np.float32, tol=1e-5),
    Case("Celu", [2, 3, 4], lambda x: F.celu(x, 0.75), {"alpha": 0.75}, dtype=np.float32, tol=1e-5),
    Case("ThresholdedRelu", [2, 3, 4], lambda x: F.threshold(x, 0.25, 0.0), {"alpha": 0.25}, dtype=np.float32,
         tol=1e-5),
    Case("Mish", [2, 3, 4], F.mish, dtype=np.float32, tol=1e-5),
    Case("Exp", [2, 3, 4], torch.exp),
    Case("Neg", [2, 3, 4], torch.neg),
    Case("Expand", [2, 1, 4], lambda x: x.expand(2, 3, 4), constants={"shape": np.asarray([2, 3, 4])}),
    Case("Expand", [2, 3, 1], lambda x: x.expand(2, 3, 5), constants={"shape": np.asarray([1, 1, 5])}),
    Case("Where", [2, 3, 4], lambda x, z: torch.where(torch.from_numpy(COND), x, z), extra=[[2, 3, 4]],
         leading={"c": COND}),
    Case("Where", [2, 3, 4], lambda x, z: torch.where(torch.from_numpy(COND), x, z), extra=[[2, 1, 4]],
         leading={"c": COND}),
    Case("ReduceSum", [2, 3, 4, 5], lambda x: x.sum((2, 3)), {"keepdims": 0}, constants={"axes": np.asarray([2, 3])}),
    Case("ReduceSum", [2, 3, 4], lambda x: x.sum(1, keepdim=True), {"axes": [1]}, opset=11),
    # attention: q @ k^T and attn @ v, both inputs variable; and a broadcast batch axis
    Case("MatMul", [2, 3, 4, 5], lambda x, z: x @ z, extra=[[2, 3, 5, 6]]),
    Case("MatMul", [2, 3, 4, 5], lambda x, z: x @ z, extra=[[2, 1, 5, 6]]),
    # timm's qkv: the batch moves from axis 0 (to 1), and back via unbind (Split or Gather, then Squeeze)
    Case("Transpose", [2, 4, 3, 2, 5], lambda x: x.permute(2, 0, 3, 1, 4), {"perm": [2, 0, 3, 1, 4]}),
    Case("Gather", [3, 2, 4], lambda x: x[1], {"axis": 0}, constants={"i": np.asarray(1)}),
    Case("Gather", [3, 2, 4], lambda x: x[torch.tensor([[0, 2]])], {"axis": 0}, constants={"i": np.asarray([[0, 2]])}),
    Case("Split", [4, 2, 3], lambda x: torch.split(x, [1, 3], 0), {"axis": 0}, outputs=2,
         constants={"split": np.asarray([1, 3])}),
    Case("Split", [4, 2, 3], lambda x: torch.split(x, [1, 3], 0), {"axis": 0}, outputs=2, no_grad=(1,),
         constants={"split": np.asarray([1, 3])}),
    Case("Squeeze", [1, 2, 3], lambda x: x[0], constants={"axes": np.asarray([0])}),
    Case("Unsqueeze", [2, 3], lambda x: x[None], constants={"axes": np.asarray([0])}),
    Case("Slice", [3, 2, 4], lambda x: x[1:2], constants={"starts": np.asarray([1]), "ends": np.asarray([2]),
         "axes": np.asarray([0])}),
    Case("Concat", [2, 3], lambda x, z: torch.cat([x, z], 0), {"axis": 0}, extra=[[1, 3]]),
    Case("Reshape", [2, 3, 4], lambda x: x.reshape(3, 8), constants={"shape": np.asarray([3, 8])}),
    Case("Flatten", [2, 3, 4, 5], lambda x: x.flatten(0, 1).flatten(1), {"axis": 2}),
    Case("Softmax", [2, 2, 5, 5], lambda x: torch.softmax(x, -1), {"axis": -1}),
    # torch's as_strided (dynamo): a flat tensor gathered with indices the graph computes at run time
    Case("Gather", [12], lambda x: x[torch.from_numpy(FLAT_INDICES)], constants={"i": FLAT_INDICES}, fed=("i",)),
    Case("BatchNormalization", [2, 3, 4, 5],
         lambda x: F.batch_norm(x, *[torch.from_numpy(v) for v in (BN[2], BN[3], BN[0], BN[1])], eps=1e-3),
         {"epsilon": 1e-3}, constants=dict(zip(["scale", "B", "mean", "var"], BN, strict=True))),
    # a segmenter's upsampling to the input size, as torch.onnx writes F.interpolate (float32: ONNX Runtime's
    # Resize has no float64 kernel; sizes, since the harness would make float scales float64)
    Case("Resize", [2, 3, 4, 5], lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), {"mode": "linear"},
         constants={"roi": None, "scales": None, "sizes": np.asarray([2, 3, 8, 10])}, dtype=np.float32, tol=1e-5),
    Case("Resize", [2, 3, 4, 5], lambda x: F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True),
         {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
         constants={"roi": None, "scales": None, "sizes": np.asarray([2, 3, 7, 9])}, dtype=np.float32, tol=1e-5),
    Case("Resize", [2, 3, 4, 5], lambda x: F.interpolate(x, scale_factor=3, mode="nearest"),
         {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
         constants={"roi": None, "scales": None, "sizes": np.asarray([2, 3, 12, 15])}, dtype=np.float32,
         tol=1e-5),
]
# fmt: on


def _ties(xs: list[np.ndarray]) -> None:
    """Two maxima (and two minima) in the first reduced row, so that the tie rule is what is checked."""
    xs[0][0, 0, 1] = xs[0][0, 0, 3] = np.abs(xs[0]).max() + 1
    xs[0][0, 0, 2] = xs[0][0, 0, 0] = -np.abs(xs[0]).max() - 1


def _zeros(xs: list[np.ndarray]) -> None:
    """Rows of a product with no zero, one zero, and two zeros."""
    xs[0][0, 1, 2] = 0.0
    xs[0][1, 2, 0] = xs[0][1, 2, 3] = 0.0


def _depth_to_space(x: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    n, c, h, w = x.shape
    if mode == "DCR":
        return x.reshape(n, k, k, c // k**2, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c // k**2, h * k, w * k)
    return F.pixel_shuffle(x, k)  # CRD


def _space_to_depth(x: torch.Tensor, k: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // k, k, w // k, k).permute(0, 3, 5, 1, 2, 4).reshape(n, c * k * k, h // k, w // k)


def _lp_pool(x: torch.Tensor, p: float, kernel: int, stride: int, padding: int = 0) -> torch.Tensor:
    summed = F.avg_pool2d(x.abs() ** p, kernel, stride, padding, count_include_pad=True) * kernel**2
    return summed ** (1 / p)


def _asymmetric_linear(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Upsample's linear mode along h and w: source o / scale, the next cell clamped at the edge."""
    for axis in (2, 3):
        n = x.shape[axis]
        source = torch.arange(n * scale, dtype=torch.float64) / scale
        low = source.floor().long()
        frac = (source - low).reshape([-1 if a == axis else 1 for a in range(4)])
        x = x.index_select(axis, low) * (1 - frac) + x.index_select(axis, (low + 1).clamp(max=n - 1)) * frac
    return x


def _cubic(x: torch.Tensor, size: tuple[int, int], a: float, exclude_outside: bool) -> torch.Tensor:
    """ONNX's cubic Resize with half_pixel coordinates written out along each axis: 4 taps of Keys' kernel, edge
    taps clamped, or (exclude_outside) dropped and the rest renormalised."""
    def kernel(d: torch.Tensor) -> torch.Tensor:
        d = d.abs()
        return torch.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)

    for axis, n_out in zip((2, 3), size, strict=True):
        n_in = x.shape[axis]
        source = (torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5
        taps = source.floor().long()[:, None] + torch.arange(-1, 3)
        weights = kernel(source[:, None] - taps)
        if exclude_outside:
            weights = torch.where((taps >= 0) & (taps < n_in), weights, 0.0)
            weights = weights / weights.sum(1, keepdim=True)
        matrix = torch.zeros(n_out, n_in, dtype=torch.float64).index_put_(
            (torch.arange(n_out)[:, None].expand(-1, 4), taps.clamp(0, n_in - 1)), weights, accumulate=True)
        x = torch.movedim(torch.movedim(x, axis, -1) @ matrix.T, -1, axis)
    return x


CONVT_W, CONVT_WG = (torch.from_numpy(RNG.standard_normal(shape)) for shape in [(4, 3, 3, 3), (4, 2, 3, 3)])
IN_SCALE, IN_BIAS = RNG.standard_normal(3), RNG.standard_normal(3)
GN_SCALE, GN_BIAS, GN_GROUP = RNG.standard_normal(6), RNG.standard_normal(6), RNG.standard_normal(3)
SLOPE = RNG.standard_normal((3, 1, 1))
EIN_W = RNG.standard_normal((5, 4))
GATHER_I = np.asarray([[[0, 2, 2, 1], [3, 3, 0, 1], [1, 1, 1, 1]], [[2, 0, 3, 3], [0, 0, 0, 2], [3, 2, 1, 0]]])
SCATTER_I = np.asarray([[[0, 2], [3, 1], [1, 0]], [[2, 0], [1, 3], [3, 2]]])
ND_I, ND_B = np.asarray([[0, 1], [1, 2], [0, 1]]), np.asarray([[[4], [0], [4], [2]], [[1], [1], [3], [0]]])
BIG = np.iinfo(np.int64).max

# fmt: off
CASES += [
    Case("ConvTranspose", [2, 4, 5, 5], lambda x: F.conv_transpose2d(x, CONVT_W, stride=2, padding=1,
         output_padding=1), {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
         constants={"W": CONVT_W.numpy()}, dtype=np.float32, tol=1e-5),
    Case("ConvTranspose", [2, 4, 5, 6], lambda x: F.conv_transpose2d(x, CONVT_WG, groups=2, dilation=2, padding=(0, 1)),
         {"group": 2, "dilations": [2, 2], "pads": [0, 1, 0, 1]}, constants={"W": CONVT_WG.numpy()},
         dtype=np.float32, tol=1e-5),
    Case("InstanceNormalization", [2, 3, 4, 5], lambda x: F.instance_norm(
         x, weight=torch.from_numpy(IN_SCALE), bias=torch.from_numpy(IN_BIAS), eps=1e-3), {"epsilon": 1e-3},
         constants={"scale": IN_SCALE, "B": IN_BIAS}, dtype=np.float32, tol=1e-5),
    Case("GroupNormalization", [2, 6, 4, 5], lambda x: F.group_norm(
         x, 3, torch.from_numpy(GN_SCALE), torch.from_numpy(GN_BIAS), eps=1e-4), {"num_groups": 3, "epsilon": 1e-4},
         constants={"scale": GN_SCALE, "bias": GN_BIAS}, opset=21, dtype=np.float32, tol=1e-5),
    Case("GroupNormalization", [2, 6, 4, 5], lambda x: F.group_norm(
         x, 3, torch.from_numpy(GN_GROUP).repeat_interleave(2), torch.from_numpy(GN_GROUP).repeat_interleave(2)),
         {"num_groups": 3}, constants={"scale": GN_GROUP, "bias": GN_GROUP}, opset=18, dtype=np.float32, tol=1e-5),
    Case("PRelu", [2, 3, 4, 5], lambda x: torch.where(x > 0, x, torch.from_numpy(SLOPE) * x),
         constants={"slope": SLOPE}, dtype=np.float32, tol=1e-5),
    Case("Max", [2, 3, 4], lambda x, z: torch.maximum(x, z), extra=[[2, 1, 4]]),
    Case("Max", [2, 3, 4], lambda x: torch.clamp(x, min=0), constants={"zero": _c(0.0)}),
    Case("Min", [2, 3, 4], lambda x, z, w: torch.minimum(torch.minimum(x, z), w), extra=[[2, 3, 4], [2, 3, 1]]),
    Case("Mean", [2, 3, 4], lambda x, z, w: (x + z + w) / 3, extra=[[2, 3, 4], [2, 1, 4]], dtype=np.float32, tol=1e-5),
    Case("ReduceMax", [2, 3, 5], lambda x: x.amax(2), {"keepdims": 0}, constants={"axes": np.asarray([2])},
         prepare=_ties),
    Case("ReduceMax", [2, 3, 5], lambda x: x.amax((1, 2), keepdim=True), constants={"axes": np.asarray([1, 2])}),
    Case("ReduceMin", [2, 3, 5], lambda x: x.amin(-1, keepdim=True), constants={"axes": np.asarray([-1])},
         prepare=_ties),
    Case("ReduceL1", [2, 3, 5], lambda x: x.abs().sum(2), {"keepdims": 0}, constants={"axes": np.asarray([2])}),
    Case("ReduceL2", [2, 3, 5], lambda x: x.norm(dim=(1, 2), keepdim=True), constants={"axes": np.asarray([1, 2])}),
    Case("ReduceSumSquare", [2, 3, 5], lambda x: (x * x).sum(1), {"keepdims": 0}, constants={"axes": np.asarray([1])}),
    Case("ReduceLogSumExp", [2, 3, 5], lambda x: torch.logsumexp(x, 2, keepdim=True),
         constants={"axes": np.asarray([2])}),
    Case("ReduceProd", [2, 3, 4], lambda x: x.prod(2), {"keepdims": 0}, constants={"axes": np.asarray([2])},
         prepare=_zeros),
    Case("ReduceProd", [2, 3, 4], lambda x: x.prod(2).prod(1), {"keepdims": 0},
         constants={"axes": np.asarray([1, 2])}),
    Case("GlobalMaxPool", [2, 3, 4, 5], lambda x: x.amax((2, 3), keepdim=True), dtype=np.float32, tol=1e-5),
    Case("LpPool", [2, 3, 6, 6], lambda x: _lp_pool(x, 2, 2, 2), {"kernel_shape": [2, 2], "strides": [2, 2]},
         dtype=np.float32, tol=1e-5),
    Case("LpPool", [2, 3, 7, 7], lambda x: _lp_pool(x, 3, 3, 2, 1), {"kernel_shape": [3, 3], "strides": [2, 2],
         "pads": [1, 1, 1, 1], "p": 3}, dtype=np.float32, tol=1e-4),
    Case("LpPool", [2, 3, 6, 6], lambda x: _lp_pool(x, 1, 3, 3), {"kernel_shape": [3, 3], "strides": [3, 3], "p": 1},
         dtype=np.float32, tol=1e-5),
    Case("LpNormalization", [2, 3, 5], lambda x: F.normalize(x, p=2, dim=-1), dtype=np.float32, tol=1e-5),
    Case("LpNormalization", [2, 3, 5], lambda x: F.normalize(x, p=1, dim=1), {"axis": 1, "p": 1},
         dtype=np.float32, tol=1e-5),
    Case("Tile", [2, 3, 4], lambda x: x.repeat(1, 2, 3), constants={"repeats": np.asarray([1, 2, 3])}),
    Case("DepthToSpace", [2, 8, 3, 4], lambda x: _depth_to_space(x, 2, "DCR"), {"blocksize": 2}),
    Case("DepthToSpace", [2, 8, 3, 4], lambda x: _depth_to_space(x, 2, "CRD"), {"blocksize": 2, "mode": "CRD"}),
    Case("SpaceToDepth", [2, 3, 4, 6], lambda x: _space_to_depth(x, 2), {"blocksize": 2}),
    Case("CumSum", [2, 3, 5], lambda x: x.cumsum(2), constants={"axis": np.asarray(2)}),
    Case("CumSum", [2, 3, 5], lambda x: x.flip(1).cumsum(1).flip(1) - x, {"reverse": 1, "exclusive": 1},
         constants={"axis": np.asarray(-2)}),
    Case("TopK", [2, 3, 6], lambda x: torch.topk(x, 3, dim=-1), outputs=2, no_grad=(1,),
         constants={"k": np.asarray([3])}),
    Case("TopK", [2, 5, 3], lambda x: torch.topk(x, 2, dim=1, largest=False), {"axis": 1, "largest": 0}, outputs=2,
         no_grad=(1,), constants={"k": np.asarray([2])}),
    Case("GatherElements", [2, 3, 4], lambda x: torch.gather(x, 2, torch.from_numpy(GATHER_I)), {"axis": 2},
         constants={"i": GATHER_I}),
    Case("GatherElements", [2, 3, 4], lambda x: torch.gather(x, 2, torch.from_numpy(GATHER_I[:, :2, :3])),
         {"axis": 2}, constants={"i": GATHER_I[:, :2, :3]}, fed=("i",)),
    Case("ScatterElements", [2, 3, 4], lambda x, z: torch.scatter(x, 2, torch.from_numpy(SCATTER_I), z), {"axis": 2},
         extra=[[2, 3, 2]], constants={"i": SCATTER_I}, order=("x0", "i", "x1")),
    Case("ScatterElements", [2, 3, 4], lambda x, z: torch.scatter_add(x, 2, torch.from_numpy(SCATTER_I), z),
         {"axis": 2, "reduction": "add"}, extra=[[2, 3, 2]], constants={"i": SCATTER_I}, order=("x0", "i", "x1")),
    Case("GatherND", [2, 3, 4], lambda x: x[ND_I[:, 0], ND_I[:, 1]], constants={"i": ND_I}),
    Case("GatherND", [2, 5, 3], lambda x: x[torch.arange(2)[:, None], torch.from_numpy(ND_B[..., 0])],
         {"batch_dims": 1}, constants={"i": ND_B}),
    Case("ScatterND", [2, 5, 3], lambda x, z: x.index_put((torch.tensor([0, 1]), torch.tensor([1, 3])), z),
         extra=[[2, 3]], constants={"i": np.asarray([[0, 1], [1, 3]])}, order=("x0", "i", "x1")),
    Case("ScatterND", [2, 5, 3], lambda x, z: x.index_put((torch.tensor([0, 0]), torch.tensor([1, 1])), z,
         accumulate=True), {"reduction": "add"}, extra=[[2, 3]], constants={"i": np.asarray([[0, 1], [0, 1]])},
         order=("x0", "i", "x1")),
    Case("Einsum", [2, 3, 5], lambda x: torch.einsum("bij,jk->bik", x, torch.from_numpy(EIN_W)),
         {"equation": "bij,jk->bik"}, constants={"w": EIN_W}),
    Case("Einsum", [2, 2, 4, 3], lambda x, z: torch.einsum("bhqd,bhkd->bhqk", x, z), {"equation": "bhqd,bhkd->bhqk"},
         extra=[[2, 2, 5, 3]]),
    Case("Einsum", [2, 3, 4], lambda x, z: torch.einsum("bij,bjk->bi", x, z), {"equation": "bij , bjk -> bi"},
         extra=[[2, 4, 6]]),
    Case("Einsum", [2, 3, 4, 5], lambda x: torch.einsum("...ij,jk->...ik", x, torch.from_numpy(EIN_W)),
         {"equation": "...ij,jk"}, constants={"w": EIN_W}),
    Case("Pad", [2, 3, 5, 6], lambda x: F.pad(x, (2, 1, 1, 3), mode="reflect"), {"mode": "reflect"},
         constants={"pads": np.asarray([0, 0, 1, 2, 0, 0, 3, 1])}),
    Case("Pad", [2, 3, 5, 6], lambda x: F.pad(x, (2, 1, 1, 3), mode="replicate"), {"mode": "edge"},
         constants={"pads": np.asarray([0, 0, 1, 2, 0, 0, 3, 1])}),
    Case("Pad", [2, 3, 5, 6], lambda x: F.pad(x, (2, 1, 1, 3), mode="circular"), {"mode": "wrap"},
         constants={"pads": np.asarray([0, 0, 1, 2, 0, 0, 3, 1])}, opset=19),
    Case("Pad", [2, 3, 5, 6], lambda x: F.pad(x, (-1, 2, 0, -2)), constants={"pads": np.asarray([0, 0, 0, -1, 0, 0,
         -2, 2])}),
    Case("Slice", [2, 7, 6], lambda x: x[:, ::2, 1::3], constants={"starts": np.asarray([0, 1]),
         "ends": np.asarray([BIG, BIG]), "axes": np.asarray([1, 2]), "steps": np.asarray([2, 3])}),
    Case("Slice", [2, 7, 6], lambda x: x[:, [5, 3, 1]].flip(2), constants={"starts": np.asarray([5, -1]),
         "ends": np.asarray([0, -BIG]), "axes": np.asarray([1, 2]), "steps": np.asarray([-2, -1])}),
    Case("Upsample", [2, 3, 4, 5], lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
         constants={"scales": np.asarray([1.0, 1.0, 2.0, 2.0], np.float32)}, opset=9, dtype=np.float32, tol=1e-5),
    Case("Upsample", [2, 3, 4, 5], lambda x: _asymmetric_linear(x, 3), {"mode": "linear"},
         constants={"scales": np.asarray([1.0, 1.0, 3.0, 3.0], np.float32)}, opset=9, dtype=np.float32, tol=1e-5),
    Case("Resize", [2, 3, 4, 5], lambda x: F.interpolate(x, size=(7, 9), mode="bicubic"),
         {"mode": "cubic", "cubic_coeff_a": -0.75}, constants={"roi": None, "scales": None,
         "sizes": np.asarray([2, 3, 7, 9])}, dtype=np.float32, tol=1e-5),
    Case("Resize", [2, 3, 4, 5], lambda x: F.interpolate(x, size=(7, 9), mode="bicubic", align_corners=True),
         {"mode": "cubic", "coordinate_transformation_mode": "align_corners"}, constants={"roi": None,
         "scales": None, "sizes": np.asarray([2, 3, 7, 9])}, dtype=np.float32, tol=1e-5),
    Case("Resize", [2, 3, 4, 5], lambda x: _cubic(x, (9, 7), -0.5, exclude_outside=True),
         {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1}, constants={"roi": None, "scales": None,
         "sizes": np.asarray([2, 3, 9, 7])}, dtype=np.float32, tol=1e-5),
    # deformable attention's sampling (RT-DETR, Deformable DETR): the values and the sampling grid both variable,
    # some of its points outside the input
    Case("GridSample", [2, 3, 5, 6], lambda x, g: F.grid_sample(x, g, align_corners=False), extra=[[2, 4, 3, 2]],
         dtype=np.float32, tol=1e-5, spread=0.7, opset=16),
    Case("GridSample", [2, 3, 5, 6], lambda x, g: F.grid_sample(x, g, padding_mode="border", align_corners=True),
         {"padding_mode": "border", "align_corners": 1}, extra=[[2, 4, 3, 2]], dtype=np.float32, tol=1e-5,
         spread=0.7, opset=16),
    Case("GridSample", [2, 3, 5, 6], lambda x, g: F.grid_sample(x, g, mode="nearest", align_corners=False),
         {"mode": "nearest"}, extra=[[2, 4, 3, 2]], dtype=np.float32, tol=1e-5, spread=0.7, opset=16),
    # ceil_mode windows past the input, and a kernel larger than the map (Hugging Face's EfficientNet pooler)
    Case("AveragePool", [2, 3, 7, 7], lambda x: F.avg_pool2d(x, 2, 2, ceil_mode=True),
         {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, dtype=np.float32, tol=1e-5),
    Case("AveragePool", [2, 3, 8, 8], lambda x: F.avg_pool2d(x, 3, 2, padding=1, ceil_mode=True),
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 1},
         dtype=np.float32, tol=1e-5),
    Case("AveragePool", [2, 3, 7, 7], lambda x: F.avg_pool2d(x, 20, 20, ceil_mode=True),
         {"kernel_shape": [20, 20], "strides": [20, 20], "ceil_mode": 1, "count_include_pad": 1},
         dtype=np.float32, tol=1e-5),
]
# fmt: on


def _one_node_model(
    op: str,
    shapes: list[list[int | str] | None],
    attrs: dict,
    constants: dict[str, np.ndarray | None],
    outputs: list[str],
    dtype: type = np.float64,
    opset: int = 18,
    fed: tuple[str, ...] = (),
    leading: dict[str, np.ndarray] | None = None,
    x_dtype: type | None = None,
    order: tuple[str, ...] = (),
) -> tuple[onnx.ModelProto, onnx.NodeProto]:
    """One ``op`` node named "node" reading the ``leading`` constants, graph inputs x0, x1, ... of ``shapes``
    (a str dim or a None shape is unknown), then ``constants`` in order: initializers, or graph inputs
    where named in ``fed`` (a None value leaves the optional input out), or all of them in ``order``. Float
    constants take ``dtype``, int ones int64; the graph inputs take ``x_dtype`` where given."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(x_dtype or dtype))
    leading = leading or {}
    inputs = [*leading, *[f"x{i}" for i in range(len(shapes))]]
    graph_inputs = [helper.make_tensor_value_info(f"x{i}", elem, s) for i, s in enumerate(shapes)]
    initializers = [numpy_helper.from_array(v, k) for k, v in leading.items()]
    for name, value in constants.items():
        if value is None:
            inputs.append("")
            continue
        if value.dtype.itemsize > 1:  # (int8 and uint8 zero points keep their type)
            value = value.astype({"i": np.int64, "f": dtype}.get(value.dtype.kind, value.dtype))
        if name in fed:
            value_elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, value_elem, value.shape))
        else:
            initializers.append(numpy_helper.from_array(value, name))
        inputs.append(name)
    node = helper.make_node(op, list(order) or inputs, outputs, name="node", **attrs)
    graph = helper.make_graph([node], "rule", graph_inputs, [], initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), node


def _backward_graph(case: Case) -> tuple[onnx.ModelProto, list[str | None], list[str]]:
    """Forward node + the rule's backward nodes: (model, input gradients, upstream gradient names)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(case.dtype))
    names = [f"x{i}" for i in range(1 + len(case.extra))]
    outputs = [f"y{i}" for i in range(case.outputs)]
    extra_out = list(RULES[case.op].extra_outputs)  # as the grafter adds them (MaxPool: Indices)
    shapes = [case.shape, *case.extra]
    model, node = _one_node_model(
        case.op,
        shapes,
        case.attrs,
        case.constants,
        outputs + extra_out,
        case.dtype,
        case.opset,
        case.fed,
        case.leading,
        case.x_dtype,
        case.order,
    )
    b = Builder(model)
    b.wanted = set(names)
    upstream = [None if i in case.no_grad else f"d{y}" for i, y in enumerate(outputs)]
    grads = input_gradients(b, node, upstream + [None] * len(extra_out))
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)  # an integer output's gradient is a float tensor
    grad_elem = {y: b.elem_type(y) if b.elem_type(y) in floats else elem for y in outputs}
    model.graph.input.extend(helper.make_tensor_value_info(d, grad_elem[y], None)
                             for d, y in zip(upstream, outputs, strict=True) if d)  # fmt: skip
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.initializers)
    model.graph.output.extend(helper.make_tensor_value_info(y, b.elem_type(y), None) for y in outputs)
    model.graph.output.extend(helper.make_tensor_value_info(g, elem, None) for g in grads if g)
    return model, grads, upstream


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rule_matches_torch_autograd(case: Case) -> None:
    model, grads, upstream = _backward_graph(case)
    by_input = dict(zip(model.graph.node[0].input, grads, strict=False))
    differentiable = [f"x{i}" for i in range(len(case.extra) + 1)]
    assert all(g is None for name, g in by_input.items() if name not in differentiable), "constants need none"
    grads = [by_input[name] for name in differentiable]
    rng = np.random.default_rng(case.seed)
    xs = [
        (rng.uniform(0.5, 2.5, s) if case.positive else rng.standard_normal(s) * case.spread).astype(
            case.x_dtype or case.dtype
        )
        for s in [case.shape, *case.extra]
    ]
    if case.prepare is not None:
        case.prepare(xs)
    xts = [torch.from_numpy(x.astype(np.float64)).requires_grad_() for x in xs]
    yts = case.torch_fn(*xts)
    yts = list(yts) if isinstance(yts, tuple | list) else [yts]
    feeds = {f"x{i}": x for i, x in enumerate(xs)} | {k: case.constants[k].astype(np.int64) for k in case.fed}
    dys = {}
    for d, yt in zip(upstream, yts, strict=True):
        if d:
            out_dtype = case.dtype if yt.dtype == torch.float64 else np.float32
            dys[d] = rng.standard_normal([yt.shape[0], TARGETS, *yt.shape[1:]]).astype(out_dtype)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = [f"y{i}" for i in range(case.outputs)] + [g for g in grads if g]
    values = dict(zip(wanted, session.run(wanted, feeds | dys), strict=True))
    for i, yt in enumerate(yts):
        reference = yt.detach().numpy()
        np.testing.assert_allclose(values[f"y{i}"], reference, rtol=case.tol, atol=case.tol, err_msg="forward")
    message = f"{case.id} seed {case.seed}"
    for index, (g, xt) in enumerate(zip(grads, xts, strict=False)):
        assert g is not None, f"{message}: no gradient for differentiable input {index}"
        pairs = [(yt, torch.from_numpy(dys[d].astype(np.float64))) for yt, d in zip(yts, upstream, strict=True) if d]
        vjps = [
            torch.autograd.grad([p[0] for p in pairs], xt, [p[1][:, t] for p in pairs], retain_graph=True)[0]
            for t in range(TARGETS)
        ]
        expected = np.stack([v.numpy() for v in vjps], axis=1)
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(values[g], expected, rtol=case.tol, atol=case.tol * scale, err_msg=message)


def test_every_rule_has_a_row() -> None:
    assert set(RULES) == {c.op for c in CASES}


@dataclass
class Refusal:
    """A node form that a rule refuses, and a phrase of the refusal's message."""

    op: str
    shapes: list[list[int | str] | None]  # graph inputs x0, x1, ...; a str dim or a None shape is unknown
    phrase: str
    attrs: dict = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    fed: tuple[str, ...] = ()  # constants fed as graph inputs instead, so the rule cannot read them
    extra_outputs: bool = True  # give the node the outputs its rule reads, as the grafter does
    opset: int = 18

    @property
    def id(self) -> str:
        return f"{self.op}:" + re.sub(r"\W+", "-", self.phrase).strip("-")


def _i(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


# fmt: off
REFUSALS = [
    Refusal("Dropout", [[2, 3]], "training_mode must be a constant false",
            constants={"ratio": np.asarray(0.5), "training_mode": np.asarray(True)}),
    Refusal("Gemm", [[8, 2]], "only transA=0 is supported", {"transA": 1}, constants={"B": W85}),
    Refusal("MaxPool", [[2, 3, 8, 8]], "the grafter must add the Indices output", {"kernel_shape": [2, 2]},
            extra_outputs=False),
    Refusal("MaxPool", [[2, 3, 8, 8]], "storage_order=1", {"kernel_shape": [2, 2], "storage_order": 1}),
    Refusal("AveragePool", [[2, 3, "H", "W"]], "needs static channel and spatial sizes", {"kernel_shape": [2, 2]}),
    Refusal("AveragePool", [[2, 3, 8, 8]], "dilations are not supported",
            {"kernel_shape": [2, 2], "dilations": [2, 2]}, opset=19),
    Refusal("Conv", [[2, 4, "H", "W"]], "needs static input and weight shapes", constants={"W": CONV_W.numpy()}),
    Refusal("ReduceMean", [[2, 3, 4, 5]], "axes must be a constant", constants={"axes": _i(2, 3)}, fed=("axes",)),
    Refusal("ReduceMean", [[2, 3, 4, 5]], "it reduces over the batch axis", constants={"axes": _i(0)}),
    Refusal("BatchNormalization", [[2, 3, 4, 5]], "training_mode=1 is not an inference graph",
            {"training_mode": 1}, constants=dict(zip(["scale", "B", "mean", "var"], BN, strict=True))),
    Refusal("Add", [[2, 3], None], "needs known ranks"),
    Refusal("Add", [[2, 3], [1, 3]], "is broadcast along the batch axis"),
    Refusal("Pow", [[2, 3]], "only a constant scalar exponent", constants={"p": _c(2.0)}, fed=("p",)),
    Refusal("Concat", [[2, "C"], [2, 3]], "needs static sizes along axis", {"axis": 1}),
    Refusal("Slice", [[2, 6, 5]], ") must be a constant",  # input 1 (starts) ...
            constants={"starts": _i(1), "ends": _i(3), "axes": _i(2)}, fed=("starts",)),
    Refusal("Slice", [[2, 6, "W"]], "needs a static size on every sliced axis",
            constants={"starts": _i(0), "ends": _i(4), "axes": _i(2), "steps": _i(2)}),
    Refusal("Resize", [[2, 3, 4, 5]], "only 4-D nearest, linear or cubic resizing", {"mode": "linear",
            "antialias": 1}, constants={"roi": None, "scales": None, "sizes": _i(2, 3, 2, 3)}),
    Refusal("Resize", [[2, 3, 4, 5]], "Resize before opset 11", {"mode": "linear"},
            constants={"scales": np.asarray([1.0, 1.0, 2.0, 2.0], np.float32)}, opset=10),
    Refusal("Upsample", [[2, 3, 4, 5]], "scales must be a constant", constants={"scales": np.ones(4, np.float32)},
            fed=("scales",), opset=9),
    Refusal("Pad", [[2, 3, "W"]], "needs a static size along padded axis", {"mode": "reflect"},
            constants={"pads": _i(0, 1, 1, 0, 1, 1)}),
    Refusal("GridSample", [[2, 3, 5, 6], [2, 4, 3, 2]], "only 4-D bilinear or nearest sampling", {"mode": "bicubic"},
            opset=16),
    Refusal("ConvTranspose", [[2, 4, 5, 5]], "auto_pad and output_shape are not supported",
            {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, constants={"W": CONVT_W.numpy()}),
    Refusal("GroupNormalization", [[2, "C", 4, 4]], "needs a static channel count", {"num_groups": 2},
            constants={"scale": np.ones(2), "bias": np.ones(2)}),
    Refusal("DepthToSpace", [[2, 8, "H", 4]], "needs a static shape to move blocks", {"blocksize": 2}),
    Refusal("ReduceL2", [[2, 3, 4]], "noop_with_empty_axes with empty axes", {"noop_with_empty_axes": 1}),
    Refusal("Tile", [[2, 3]], "repeats must be a constant", constants={"r": _i(1, 2)}, fed=("r",)),
    Refusal("Tile", [[2, 3]], "it repeats the batch axis", constants={"r": _i(2, 1)}),
    Refusal("CumSum", [[2, 3]], "axis must be a constant", constants={"axis": _i(1)}, fed=("axis",)),
    Refusal("CumSum", [[2, 3]], "it works along the batch axis", constants={"axis": _i(0)}),
    Refusal("ScatterElements", [[2, 3], [2, 1]], "is not supported (only none and add)", {"axis": 1,
            "reduction": "mul"}, constants={"i": _i(0, 1).reshape(2, 1)}),
    Refusal("GatherND", [[2, 3, 4, 5]], "batch_dims above 1", {"batch_dims": 2},
            constants={"i": np.zeros((2, 3, 1), np.int64)}),
    Refusal("LpNormalization", [[2, 3]], "is not a norm ONNX defines", {"p": 3}),
    Refusal("Einsum", [[2, 3, 3]], "a subscript repeated within one operand", {"equation": "bii->bi"}),
    Refusal("Einsum", [[2, 3, 4], [2, 1, 4]], "operands broadcast against each other",
            {"equation": "bij,bij->bi"}),
    Refusal("Einsum", [[3, 2]], "must lead with the output's batch subscript", {"equation": "ib,ij->bj"},
            constants={"w": np.ones((3, 4))}),
    Refusal("Pad", [[2, 3, 4]], "it pads the batch axis", constants={"pads": _i(1, 0, 0, 0, 0, 0)}),
    Refusal("Gather", [[2, 5, 3]], "needs constant indices", {"axis": 1}, constants={"i": _i(1, 2)}, fed=("i",)),
    Refusal("Gather", [[5]], "indices computed at run time need opset 16", constants={"i": _i(1, 2)}, fed=("i",),
            opset=13),
    Refusal("MatMul", [[2, 3], [3]], "1-D operands are not supported"),
    Refusal("DequantizeLinear", [[2, 8]], "blocked quantization (block_size)", {"axis": 1, "block_size": 4},
            constants={"s": np.ones((2, 2), np.float32)}, opset=21),
    Refusal("QuantizeLinear", [[2, 3]], "a per-axis scale along the batch axis", {"axis": 0},
            constants={"s": np.ones(2, np.float32), "z": np.zeros(2, np.uint8)}),
    Refusal("QuantizeLinear", [[2, 3]], "only integer outputs", constants={"s": np.ones(1, np.float32),
            "z": np.zeros(1, np.float32)}, opset=19),
]
# fmt: on


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda r: r.id)
def test_rule_refuses_a_node_form_it_cannot_differentiate(refusal: Refusal) -> None:
    outputs = ["y"] + (list(RULES[refusal.op].extra_outputs) if refusal.extra_outputs else [])
    model, node = _one_node_model(
        refusal.op, refusal.shapes, refusal.attrs, refusal.constants, outputs, opset=refusal.opset, fed=refusal.fed
    )
    b = Builder(model)
    b.wanted = {f"x{i}" for i in range(len(refusal.shapes))}
    with pytest.raises(UnsupportedOp, match=re.escape(refusal.phrase)) as refused:
        input_gradients(b, node, ["dy"] + [None] * (len(outputs) - 1))
    assert str(refused.value).startswith(f"{refusal.op} node 'node': "), "the message names the op and the node"


def test_every_refusal_has_a_row() -> None:
    """Every raise in vjp.py is a ``_unsupported(node, why)`` whose literal ``why`` one row's phrase matches."""
    raises = [n for n in ast.walk(ast.parse(Path(vjp.__file__).read_text())) if isinstance(n, ast.Raise)]
    assert all(isinstance(r.exc, ast.Call) and getattr(r.exc.func, "id", "") == "_unsupported" for r in raises)
    messages = [ast.unparse(r.exc.args[1]) for r in raises]
    rows = {m: [r.phrase for r in REFUSALS if r.phrase in m] for m in messages}
    assert all(len(phrases) == 1 for phrases in rows.values()), rows
    assert len(REFUSALS) == len(messages), "one row per refusal"


def _model(nodes: list[onnx.NodeProto], x_shape: list[int], **weights: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)], [],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(("domain", "op"), [("", "Trilu"), ("com.microsoft", "Gelu")])
def test_op_without_a_rule_is_named_with_its_node_and_the_supported_ops(domain: str, op: str) -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node(op, ["a"], ["r"], name="mystery", domain=domain),
        helper.make_node("Flatten", ["r"], ["scores"]),
    ]
    with pytest.raises(UnsupportedOp) as refused:
        graft(_model(nodes, [2, 3, 4, 4]), "a", "scores")
    assert f"no gradient rule for op '{op}' (node 'mystery')" in str(refused.value)
    assert f"supported ops: {', '.join(sorted(RULES))}." in str(refused.value)


def test_rule_returning_more_gradients_than_inputs_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(RULES, "Relu", Rule(lambda b, node, dy: [dy[0], None]))
    model, node = _one_node_model("Relu", [[2, 3]], {}, {}, ["y"])
    expected = "the Relu rule returned 2 gradients ['dy', None] for node 'node', which has 1 inputs"
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        input_gradients(Builder(model), node, ["dy"])


def test_target_layer_the_rules_give_no_gradient_is_refused() -> None:
    """A layer that reaches the logits only through a comparison (a boolean) gets no gradient."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Greater", ["a", "zero"], ["positive"]),
        helper.make_node("Where", ["positive", "w", "zero"], ["scores"]),
    ]
    model = _model(nodes, [2, 5], w=RNG.standard_normal((2, 5)), zero=np.zeros(1))
    with pytest.raises(UnsupportedOp, match="no gradient reaches 'activations' from 'logits'"):
        graft(model, "a", "scores")


# -- the op facts beside the rules (export/ops.py) ----------------------------------------------------------
GRADIENT_FACTS = ("pointwise", "local", "mass_preserving", "reshaping", "softmax", "squashing", "step_back")


def test_every_op_a_gradient_passes_has_a_rule_and_no_integer_op_has_one() -> None:
    from onnxcam_export.ops import ops_with

    for fact in GRADIENT_FACTS:
        assert ops_with(fact) <= set(RULES), (fact, sorted(ops_with(fact) - set(RULES)))
    assert not ops_with("integer") & set(RULES)


def _single_op(op: str, inputs: list[tuple[str, int]], output: int = onnx.TensorProto.UNDEFINED) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node(op, [n for n, _ in inputs], ["y"])], op,
                              [helper.make_tensor_value_info(n, t, [1, 2, 3, 3]) for n, t in inputs],
                              [helper.make_tensor_value_info("y", output, None)])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_an_integer_op_gives_no_float_output() -> None:
    """As ONNX's shape inference types each op's output for float (or, for logic ops, bool) inputs."""
    from onnxcam_export.ops import ops_with
    from onnxcam_export.walk import FLOATS

    logic, f = {"Not", "And", "Or", "Xor"}, onnx.TensorProto.FLOAT
    for op in sorted(ops_with("integer")):
        kind = onnx.TensorProto.BOOL if op in logic else f
        arity = 1 if op in {"Not", "Shape", "Size", "IsNaN", "IsInf", "ArgMax", "ArgMin", "NonZero"} else 2
        model = onnx.shape_inference.infer_shapes(_single_op(op, [(f"x{i}", kind) for i in range(arity)]), True)
        assert model.graph.output[0].type.tensor_type.elem_type not in FLOATS, op


def test_a_pointwise_op_changes_only_the_element_its_input_changed() -> None:
    """Each op the table calls point-wise, run by ONNX Runtime: a change of one input element moves one output
    element, the same (BatchNormalization: per channel)."""
    from onnxcam_export.ops import ops_with

    f, rng = onnx.TensorProto.FLOAT, np.random.default_rng(0)
    extra = {"BatchNormalization": {"scale": [1.5, 0.5], "bias": [0.1, -0.2], "mean": [0.3, 0.0], "var": [1.0, 2.0]}}
    for op in sorted(ops_with("pointwise")):
        data = ["x", "x2"][: 1 if op in ops_with("unary") else 2]
        constants = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in extra.get(op, {}).items()]
        model = _single_op(op, [(n, f) for n in data], output=f)
        model.graph.input.extend(helper.make_tensor_value_info(c.name, f, [2]) for c in constants)
        model.graph.node[0].input.extend(c.name for c in constants)
        model.graph.initializer.extend(constants)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {n: rng.uniform(1.5, 2.5, (1, 2, 3, 3)).astype(np.float32) for n in data}  # (above ThresholdedRelu's 1)
        if op in ("Max", "Min"):  # the changed input is the one picked
            feed["x2"] = feed["x"] + (-1.0 if op == "Max" else 1.0)
        before = session.run(None, feed)[0]
        feed["x"] = feed["x"].copy()
        feed["x"][0, 1, 1, 2] += 0.25
        changed = np.argwhere(session.run(None, feed)[0] != before)
        assert changed.tolist() == [[0, 1, 1, 2]], (op, changed.tolist())



def _with_a_side_path(side: list[onnx.NodeProto]) -> tuple[onnx.ModelProto, np.ndarray]:
    """scores [2, 3] = sum_hw(a * w) + side_out, where the ``side`` nodes compute side_out ([2, 1] or [2, 3])
    from the layer a = relu(x); and w [3, 4, 4]."""
    w = RNG.standard_normal((3, 4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Mul", ["a", "w"], ["aw"]),
        helper.make_node("ReduceSum", ["aw", "axes"], ["main"], keepdims=0),
        *side,
        helper.make_node("Add", ["main", "side_out"], ["scores"]),
    ]
    model = _model(nodes, [2, 3, 4, 4], w=w)
    model.graph.initializer.append(numpy_helper.from_array(np.asarray([2, 3]), "axes"))
    return model, w


SIDE_PATHS = {  # a side path that carries no gradient to the scores, and so needs no rule on the way
    # the layer reaches the scores only through indices (RT-DETR's ReduceMax picks its queries by TopK); Trilu
    # stands for any op without a rule
    "indices": [helper.make_node("Trilu", ["a"], ["t"]), helper.make_node("ArgMax", ["t"], ["i"], axis=1),
                helper.make_node("ReduceMax", ["i", "axes"], ["m"], keepdims=0),
                helper.make_node("Cast", ["m"], ["side_out"], to=onnx.TensorProto.FLOAT)],
    # through an op whose derivative is zero almost everywhere
    "flat": [helper.make_node("Floor", ["a"], ["f"]), helper.make_node("Trilu", ["f"], ["t"]),
             helper.make_node("ReduceMean", ["t", "axes"], ["side_out"], keepdims=0)],
}


@pytest.mark.parametrize("side", SIDE_PATHS)
def test_a_path_that_carries_no_gradient_needs_no_rule(side: str) -> None:
    """The grafted weights are those of the main path alone: sum_hw(a * w) by a is w, so class c's weights are
    mean_hw(w[c]) in channel c and zero elsewhere."""
    model, w = _with_a_side_path(SIDE_PATHS[side])
    grafted = graft(model, "a", "scores").model
    session = ort.InferenceSession(grafted.SerializeToString(), providers=["CPUExecutionProvider"])
    x = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    weights, classes = session.run(["weights", "target_classes"], {"x": x, "targets": np.asarray([[0, 2]] * 2)})
    expected = np.zeros((2, 2, 3), np.float32)
    for t, c in enumerate([0, 2]):
        expected[:, t, c] = w[c].mean()
    assert classes.tolist() == [[0, 2]] * 2
    np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("keepdims", [0, 1])
def test_a_mean_over_a_token_axis_first_is_differentiated(keepdims: int) -> None:
    """An attention pool's first step (open_clip's ModifiedResNet, CLIP RN50): the grid as tokens first,
    ``[HW, N, C]``, averaged over them; axis 0 is no batch axis there (16 tokens, a batch of 2), so the mean
    over it has a gradient, equal to torch autograd's. Over the batch axis itself it is refused (REFUSALS)."""
    w = RNG.standard_normal((3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Reshape", ["a", "cells"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["tokens"], perm=[2, 0, 1]),  # [16, N, 3]
        helper.make_node("ReduceMean", ["tokens", "axes"], ["m" if keepdims else "mean"], keepdims=keepdims),
        *[helper.make_node("Squeeze", ["m", "axes"], ["mean"])] * keepdims,
        helper.make_node("Mul", ["mean", "mean"], ["square"]),
        helper.make_node("MatMul", ["square", "w"], ["scores"]),
    ]
    model = _model(nodes, [2, 3, 4, 4], w=w)
    model.graph.initializer.extend([numpy_helper.from_array(np.asarray([0, 3, 16]), "cells"),
                                    numpy_helper.from_array(np.asarray([0]), "axes")])  # fmt: skip
    session = ort.InferenceSession(graft(model, "a", "scores").model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    x = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    (weights,) = session.run(["weights"], {"x": x, "targets": np.asarray([[0, 2]] * 2)})
    a = torch.relu(torch.from_numpy(x).double()).requires_grad_(True)
    scores = a.reshape(2, 3, 16).permute(2, 0, 1).mean(0).square() @ torch.from_numpy(w).double()
    for t, c in enumerate([0, 2]):
        (grad,) = torch.autograd.grad(scores[:, c].sum(), a, retain_graph=True)
        np.testing.assert_allclose(weights[:, t], grad.mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["Floor", "Ceil", "Round", "Sign"])
def test_a_flat_op_is_one_torch_gives_a_zero_gradient(op: str) -> None:
    """The ops the table calls flat: torch autograd's derivative of each is zero (away from its jumps)."""
    from onnxcam_export.ops import ops_with

    assert op in ops_with("flat") and op not in RULES
    x = torch.from_numpy(RNG.standard_normal(50) + 0.25).requires_grad_()
    (grad,) = torch.autograd.grad(getattr(torch, op.lower())(x).sum(), x)
    assert not grad.any()


@pytest.mark.parametrize("op", ["If", "Loop"])
def test_control_flow_on_the_path_is_refused_naming_the_node(op: str) -> None:
    """A head whose gradient would pass through an If's branches or a Loop's body (a float path inside)."""
    body_in = [helper.make_tensor_value_info(n, t, s) for n, t, s in
               [("i", onnx.TensorProto.INT64, []), ("go", onnx.TensorProto.BOOL, [])]] if op == "Loop" else []
    body = helper.make_graph(
        [helper.make_node("Identity", ["go"] if op == "Loop" else ["cond"], ["go_out"]),
         helper.make_node("Relu", ["a"], ["inner"])], "body", body_in,
        ([helper.make_tensor_value_info("go_out", onnx.TensorProto.BOOL, [])] if op == "Loop" else [])
        + [helper.make_tensor_value_info("inner", onnx.TensorProto.FLOAT, None)])  # fmt: skip
    if op == "If":
        flow = helper.make_node("If", ["cond"], ["flowed"], name="choose", then_branch=body, else_branch=body)
    else:
        body.node[0].input[0] = "go"
        flow = helper.make_node("Loop", ["trips", "cond"], ["flowed"], name="choose", body=body)
    nodes = [helper.make_node("Relu", ["x"], ["a"]), flow, helper.make_node("Flatten", ["flowed"], ["scores"])]
    model = _model(nodes, [2, 3, 4, 4])
    model.graph.initializer.extend([numpy_helper.from_array(np.asarray(True), "cond"),
                                    numpy_helper.from_array(np.asarray(1), "trips")])  # fmt: skip
    with pytest.raises(UnsupportedOp, match=f"control flow between the target layer and the logits: {op} node "
                                            "'choose', whose .* onnxcam does not differentiate"):  # fmt: skip
        graft(model, "a", "scores")
