"""Picking one token early (``simplify.pick_tokens_early``): a ViT's class token taken before the per-token ops
that follow its last attention, so that they run on that token alone, with the same outputs, never past a target
layer."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam_export.builder import infer_types
from onnxcam_export.simplify import pick_tokens_early

TOKENS, WIDTH = 5, 4


def _tokens_model() -> onnx.ModelProto:
    """x [N, 5, 4] -> LayerNormalization over axis 2 -> Relu ("layer") -> MatMul -> + bias -> * itself -> token 2
    -> [N, 3]."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
               for n, s in (("scale", (WIDTH,)), ("shift", (WIDTH,)), ("w", (WIDTH, 3)), ("bias", (3,)))]  # fmt: skip
    weights.append(numpy_helper.from_array(np.array(2, np.int64), "index"))
    nodes = [
        helper.make_node("LayerNormalization", ["x", "scale", "shift"], ["normed"], axis=2),  # (counted from 0)
        helper.make_node("Relu", ["normed"], ["layer"]),
        helper.make_node("MatMul", ["layer", "w"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "shifted"], ["squared"]),
        helper.make_node("Gather", ["squared", "index"], ["y"], axis=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", TOKENS, WIDTH])
    graph = helper.make_graph(nodes, "tokens", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              weights)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


@pytest.mark.parametrize(("keep", "picked"), [((), "x"), (("layer",), "layer")])
def test_the_token_is_picked_before_the_per_token_ops_and_never_past_a_target_layer(keep: tuple, picked: str) -> None:
    model = _tokens_model()
    x = np.random.default_rng(1).standard_normal((2, TOKENS, WIDTH)).astype(np.float32)
    expected = _run(model, x)
    assert pick_tokens_early(model, infer_types(model), set(keep))
    onnx.checker.check_model(model, full_check=True)
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    assert [n.input[0] for n in gathers] == [picked]
    produced = {o for n in model.graph.node for o in n.output}
    assert not {"product", "shifted", "squared"} & produced  # (the full-token ops are gone)
    assert ("layer" in produced) == bool(keep)
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-6, atol=1e-6)


def test_a_token_op_that_mixes_tokens_or_a_second_reader_stops_the_pick() -> None:
    """A Softmax over the tokens is no per-token op; a tensor another node (or the graph) reads is still made."""
    model = _tokens_model()
    model.graph.node[2].input[0] = "mixed"
    model.graph.node.insert(2, helper.make_node("Softmax", ["layer"], ["mixed"], axis=1))
    model.graph.output.append(helper.make_tensor_value_info("shifted", TensorProto.FLOAT, ["N", TOKENS, 3]))
    assert pick_tokens_early(model, infer_types(model), set())
    gathers = [n.input[0] for n in model.graph.node if n.op_type == "Gather"]
    assert gathers == ["shifted"]  # (a graph output: picked there, not crossed)
    x = np.random.default_rng(1).standard_normal((2, TOKENS, WIDTH)).astype(np.float32)
    reference = _tokens_model()
    reference.graph.node[2].input[0] = "mixed"
    reference.graph.node.insert(2, helper.make_node("Softmax", ["layer"], ["mixed"], axis=1))
    np.testing.assert_allclose(_run(model, x), _run(reference, x), rtol=1e-6, atol=1e-6)


def test_two_tokens_picked_from_one_tensor_are_two_picks() -> None:
    """A DeiT picks its class and its distillation token from the same tensor: each pick gets its own tensors (they
    were both named ``<tensor>/picked``, and ONNX Runtime refused the file)."""
    model = _tokens_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "first"))
    model.graph.node.append(helper.make_node("Gather", ["squared", "first"], ["z"], axis=1))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3]))
    x = np.random.default_rng(1).standard_normal((2, TOKENS, WIDTH)).astype(np.float32)
    names = ["y", "z"]
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(names, {"x": x})
    assert pick_tokens_early(model, infer_types(model), set())
    onnx.checker.check_model(model, full_check=True)
    found = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(names, {"x": x})
    for a, b in zip(found, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
