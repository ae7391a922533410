"""Small classifiers written with onnx's helper (no torch): for the tests that run in venvs without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE, CLASSES = 32, 5
LAYER = "features"  # [N, 16, 8, 8], the last ReLU


def classifier(path: Path, lstm: bool = False) -> Path:
    """conv-ReLU twice to an 8x8 grid, global average pool, linear, softmax (seeded random weights, dynamic
    batch, as OpenVINO XAI needs); ``lstm``: an LSTM over the 64 cells instead of the pool (no gradient rule)."""
    rng = np.random.default_rng(0)
    w = {"w1": rng.normal(0, 0.5, (8, 3, 3, 3)), "w2": rng.normal(0, 0.3, (16, 8, 3, 3)),
         "fc": rng.normal(0, 1.0, (16, CLASSES)), "b": rng.normal(0, 0.1, CLASSES)}  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], [LAYER], name=LAYER)]  # fmt: skip
    if lstm:
        w |= {"lw": rng.normal(0, 0.3, (1, 64, 16)), "lr": rng.normal(0, 0.3, (1, 64, 16))}
        nodes += [helper.make_node("Reshape", [LAYER, "cells"], ["flat"]),
                  helper.make_node("Transpose", ["flat"], ["seq"], perm=[2, 0, 1]),  # [64, N, 16]
                  helper.make_node("LSTM", ["seq", "lw", "lr"], ["", "last"], hidden_size=16),  # last: [1, N, 16]
                  helper.make_node("Squeeze", ["last", "zero"], ["pooled"])]  # fmt: skip
    else:
        nodes += [helper.make_node("GlobalAveragePool", [LAYER], ["gap"]),
                  helper.make_node("Flatten", ["gap"], ["pooled"])]
    nodes += [helper.make_node("Gemm", ["pooled", "fc", "b"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]  # fmt: skip
    weights = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    weights += [numpy_helper.from_array(np.array([0, 16, 64], np.int64), "cells"),
                numpy_helper.from_array(np.array([0], np.int64), "zero")]  # fmt: skip
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])]
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", CLASSES])]
    graph = helper.make_graph(nodes, "cnn", inputs, outputs, weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path
