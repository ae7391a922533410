"""How the search for target layers scales with the graph: ``candidate_layers`` on residual CNNs of 1k to 16k nodes.

    python benchmarks/candidates.py [--nodes 1000 4000 16000] [--before 4000]

Each graph is a chain of residual blocks (Conv, Relu, Add) on an 8x8 grid, then a pool and a linear head, as
large ResNets and transformers look to ``export --from``. Prints seconds per search, and for graphs up to
``--before`` nodes the per-candidate walk it replaced (one walk to the logits per candidate: quadratic), with
the ratio, and checks that both find the same layers.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcam_export.builder import infer_types
from onnxcam_export.from_onnx import _shapes, candidate_layers
from onnxcam_export.layouts import infer_layouts
from onnxcam_export.vjp import UnsupportedOp
from onnxcam_export.walk import FLOATS, head_nodes, inputs_of, shape_only_tensors


def residual_cnn(nodes: int) -> onnx.ModelProto:
    """About ``nodes`` nodes: (nodes - 3) / 3 residual blocks on [N, 8, 8, 8], a pool, a flatten, a MatMul."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.1, (8, 8, 3, 3)).astype(np.float32), "w")
    head = numpy_helper.from_array(rng.normal(0, 0.1, (8, 4)).astype(np.float32), "fc")
    graph, x = [], "x"
    for i in range(max(1, (nodes - 3) // 3)):
        graph += [
            helper.make_node("Conv", [x, "w"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            helper.make_node("Add", [f"r{i}", x], [f"x{i}"]),
        ]
        x = f"x{i}"
    graph += [helper.make_node("GlobalAveragePool", [x], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("MatMul", ["f", "fc"], ["scores"])]  # fmt: skip
    made = helper.make_graph(
        graph,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4])],
        [weight, head],
    )
    return helper.make_model(made, opset_imports=[helper.make_opsetid("", 17)])


def walked(graph: onnx.GraphProto, logits: str, layouts: dict, types: dict) -> list[str]:
    """The search as it was: every candidate walked to the logits on its own."""
    static = shape_only_tensors(graph)

    def cut(name: str) -> bool:
        try:
            head = head_nodes(graph, name, logits)
        except UnsupportedOp:
            return False
        inside = {name} | {o for n in head for o in n.output} | static
        floating = {i for n in head for i in inputs_of(n) if i not in types or types[i].elem_type in FLOATS}
        return all(i in inside for n in head for i in inputs_of(n) if i in floating)

    return [o for n in graph.node for o in n.output if o in layouts and o not in static and cut(o)]


def timed(search, *args: object) -> tuple[float, list[str]]:
    start = time.perf_counter()
    found = search(*args)
    return time.perf_counter() - start, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--before", type=int, default=4000, help="time the per-candidate walk up to this size")
    args = parser.parse_args()
    print("| nodes | candidates | linear search (s) | per-candidate walk (s) | ratio |")
    print("|---|---|---|---|---|")
    for count in args.nodes:
        model = residual_cnn(count)
        types = infer_types(model)
        layouts = infer_layouts(model.graph, _shapes(types), "x", True, "N")
        seconds, found = timed(candidate_layers, model.graph, "scores", layouts, types)
        before, ratio = "-", "-"
        if count <= args.before:
            old, expected = timed(walked, model.graph, "scores", layouts, types)
            assert found == expected, "the linear search found other layers than the walk"
            before, ratio = f"{old:.2f}", f"{old / seconds:.0f}x"
        print(f"| {len(model.graph.node)} | {len(found)} | {seconds:.3f} | {before} | {ratio} |")


if __name__ == "__main__":
    main()
