"""Each VJP rule against torch autograd: one row per (op, shapes, attributes) case.

A row builds a one-node ONNX graph, lets the rule emit its backward nodes, runs both in
ONNX Runtime and compares the input gradient with ``torch.autograd.grad`` for every one of
T = 3 upstream gradients. Rows run in float64 (tolerance 1e-10) except where ONNX
Runtime's CPU kernels exist for float32 only (AveragePool/ConvTranspose: 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")
F = torch.nn.functional

from onnxcam_export.builder import Builder  # noqa: E402
from onnxcam_export.vjp import RULES  # noqa: E402

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

    @property
    def id(self) -> str:
        extras = ",".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{self.op}{self.shape}[{extras}]"


def _c(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


RNG = np.random.default_rng(1234)
W85, W58, BIAS5 = RNG.standard_normal((8, 5)), RNG.standard_normal((5, 8)), RNG.standard_normal(5)
BN = [RNG.standard_normal(3), RNG.standard_normal(3), RNG.standard_normal(3), RNG.uniform(0.5, 2, 3)]
W85_T, W58_T, BIAS5_T = (torch.from_numpy(v) for v in (W85, W58, BIAS5))
CONV_W, CONV_B, CONV_WG, CONV_DW, CONV_W4 = (
    torch.from_numpy(RNG.standard_normal(shape))
    for shape in [(6, 4, 3, 3), (6,), (6, 2, 3, 3), (4, 1, 3, 3), (5, 4, 4, 4)]
)

# fmt: off
CASES = [
    Case("Relu", [2, 3, 4, 5], F.relu),
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
    Case("GlobalAveragePool", [2, 3, 4, 5], lambda x: x.mean((2, 3), keepdim=True), dtype=np.float32, tol=1e-5),
    Case("ReduceMean", [2, 3, 4, 5], lambda x: x.mean((2, 3)), {"keepdims": 0}, constants={"axes": np.asarray([2, 3])}),
    Case("ReduceMean", [2, 3, 4, 5], lambda x: x.mean(-1, keepdim=True), constants={"axes": np.asarray([-1])}),
    Case("BatchNormalization", [2, 3, 4, 5],
         lambda x: F.batch_norm(x, *[torch.from_numpy(v) for v in (BN[2], BN[3], BN[0], BN[1])], eps=1e-3),
         {"epsilon": 1e-3}, constants=dict(zip(["scale", "B", "mean", "var"], BN, strict=True))),
]
# fmt: on


def _backward_graph(case: Case) -> tuple[onnx.ModelProto, list[int]]:
    """Forward node + the rule's backward nodes; returns the model and which inputs get gradients."""
    x = helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(np.dtype(case.dtype)), case.shape)
    inputs, initializers = ["x"], []
    for name, value in case.constants.items():
        if value is None:
            inputs.append("")
            continue
        dtype = np.int64 if value.dtype.kind == "i" else case.dtype
        initializers.append(numpy_helper.from_array(value.astype(dtype), name))
        inputs.append(name)
    outputs = ["y", "indices"] if case.op == "MaxPool" else ["y"]  # the grafter adds Indices to MaxPools
    node = helper.make_node(case.op, inputs, outputs, name="node", **case.attrs)
    model = helper.make_model(
        helper.make_graph([node], "rule", [x], [], initializer=initializers),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    b = Builder(model)
    elem = x.type.tensor_type.elem_type
    grads = RULES[case.op](b, node, ["dy", None][: len(node.output)])
    assert len(grads) == len(node.input), f"{case.op}: one gradient per input"
    model.graph.input.append(helper.make_tensor_value_info("dy", elem, None))
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.initializers)
    model.graph.output.extend(helper.make_tensor_value_info(n, elem, None) for n in ["y", grads[0]])
    return model, grads


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rule_matches_torch_autograd(case: Case) -> None:
    model, grads = _backward_graph(case)
    assert all(g is None for g in grads[1:]), "only the data input needs a gradient"
    rng = np.random.default_rng(case.seed)
    x = rng.standard_normal(case.shape).astype(case.dtype)
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    yt = case.torch_fn(xt)
    dy = rng.standard_normal([x.shape[0], TARGETS, *yt.shape[1:]]).astype(case.dtype)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, dx = session.run(["y", grads[0]], {"x": x, "dy": dy})
    reference = yt.detach().numpy()
    np.testing.assert_allclose(y, reference, rtol=case.tol, atol=case.tol, err_msg=f"forward, seed {case.seed}")
    vjps = [torch.autograd.grad(yt, xt, torch.from_numpy(dy[:, t].astype(np.float64)), retain_graph=True)[0]
            for t in range(TARGETS)]  # fmt: skip
    expected = np.stack([v.numpy() for v in vjps], axis=1)
    scale = max(1.0, float(np.abs(expected).max()))
    message = f"{case.id} seed {case.seed}"
    np.testing.assert_allclose(dx, expected, rtol=case.tol, atol=case.tol * scale, err_msg=message)


def test_every_rule_has_a_row() -> None:
    assert set(RULES) == {c.op for c in CASES}
