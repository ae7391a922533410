"""What the grafter knows of an ONNX op beyond its gradient rule: one table, beside :data:`vjp.RULES`.

Each module that treats ops by group (the walker's integer tensors, the presummed head's mass-preserving ops,
the windowed walk's local ops, the layout inference's grid producers, INT8's kept-in-float chain, the head
reader's softmax and reshapes) asks this table, so an op's facts are written once. ``tests/test_vjp_rules.py``
checks the groups against the rules: every op a gradient passes through has a rule, no integer-only op has one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpFacts:
    """The facts of one op (all False by default).

    ``pointwise``: each output element reads the same element of each (broadcast) input, or a per-channel
    affine of it (BatchNormalization). ``unary``: one data input (the rest constants). ``local``: output cell
    (y, x) of a 4-D tensor reads a window of each input around it. ``mass_preserving``: its backward only moves
    gradient within a channel and keeps its sum. ``integer``: its outputs are never float, whatever its inputs.
    ``grid``: its output is ``[N, C, h, w]``. ``reshaping``: it only changes the shape. ``softmax``: a softmax
    over the classes. ``squashing``: maps into a fixed range (an image's last op, not a class score's).
    ``step_back``: a trailing pool or layout change, no better target layer than its input. ``quantized``:
    ONNX Runtime's quantized kernels and the QDQ pair. ``flat``: a float output whose derivative is zero almost
    everywhere (rounding, signs, one-hot maxima, random draws), so no gradient passes and no rule is asked for.
    ``no_empty_batch``: ONNX Runtime cannot run it on an empty batch (its recurrent kernels abort the process,
    1.32): a file holding one never feeds head-only passes an empty image batch.
    """

    pointwise: bool = False
    unary: bool = False
    local: bool = False
    mass_preserving: bool = False
    integer: bool = False
    grid: bool = False
    reshaping: bool = False
    softmax: bool = False
    squashing: bool = False
    step_back: bool = False
    quantized: bool = False
    flat: bool = False
    no_empty_batch: bool = False


_ACTIVATION = OpFacts(pointwise=True, unary=True, local=True)
_SQUASH = OpFacts(pointwise=True, unary=True, local=True, squashing=True)
_BINARY = OpFacts(pointwise=True, local=True)
_INTEGER = OpFacts(integer=True)
_RESHAPE = OpFacts(reshaping=True)
_QUANTIZED = OpFacts(quantized=True)
_FLAT = OpFacts(flat=True)

OPS: dict[str, OpFacts] = {
    **dict.fromkeys(["Relu", "LeakyRelu", "HardSwish", "Erf", "Neg", "Exp", "Sqrt", "Gelu", "Abs", "Log",
                     "Reciprocal", "Sin", "Cos", "Softplus", "Softsign", "Elu", "Selu", "Celu", "ThresholdedRelu",
                     "Mish"], _ACTIVATION),
    **dict.fromkeys(["Sigmoid", "Tanh", "HardSigmoid", "Clip"], _SQUASH),
    **dict.fromkeys(["Add", "Sub", "Mul", "Div", "PRelu", "Max", "Min", "Mean"], _BINARY),
    "Identity": OpFacts(pointwise=True, unary=True, local=True, mass_preserving=True, reshaping=True),
    "Dropout": OpFacts(mass_preserving=True),
    "BatchNormalization": OpFacts(pointwise=True, unary=True, local=True, grid=True),
    "Conv": OpFacts(local=True, grid=True),
    "ConvTranspose": OpFacts(grid=True),
    **dict.fromkeys(["InstanceNormalization", "GroupNormalization", "DepthToSpace", "SpaceToDepth"],
                    OpFacts(grid=True)),
    "Concat": OpFacts(local=True),
    "Split": OpFacts(local=True),
    "MaxPool": OpFacts(mass_preserving=True, grid=True, step_back=True),
    "AveragePool": OpFacts(mass_preserving=True, grid=True, step_back=True),
    "LpPool": OpFacts(grid=True, step_back=True),
    **dict.fromkeys(["GlobalAveragePool", "GlobalMaxPool"], OpFacts(mass_preserving=True, grid=True)),
    "Transpose": OpFacts(step_back=True),
    **dict.fromkeys(["Flatten", "Reshape", "Squeeze"], _RESHAPE),
    **dict.fromkeys(["Softmax", "LogSoftmax"], OpFacts(softmax=True)),
    **dict.fromkeys(["Shape", "Size", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And",
                     "Or", "Xor", "IsNaN", "IsInf", "ArgMax", "ArgMin", "NonZero"], _INTEGER),
    **dict.fromkeys(["Floor", "Ceil", "Round", "Sign", "Hardmax", "EyeLike", "RandomNormalLike",
                     "RandomUniformLike", "Bernoulli", "Multinomial"], _FLAT),
    **dict.fromkeys(["LSTM", "GRU", "RNN"], OpFacts(no_empty_batch=True)),
    "QuantizeLinear": _QUANTIZED,
    "DequantizeLinear": _QUANTIZED,
    **dict.fromkeys(["QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
                     "DynamicQuantizeLinear"], _QUANTIZED),
}  # fmt: skip

FACTS = tuple(OpFacts.__dataclass_fields__)


def facts(op: str) -> OpFacts:
    """The facts of ``op`` (none for an op the table does not list)."""
    return OPS.get(op, OpFacts())


def ops_with(fact: str) -> frozenset[str]:
    """The ops that have ``fact`` (a field of :class:`OpFacts`)."""
    if fact not in FACTS:
        raise ValueError(f"unknown op fact {fact!r}; one of {', '.join(FACTS)}")
    return frozenset(op for op, f in OPS.items() if getattr(f, fact))
