"""INT8: ``onnxcam quantize`` (a build step) and user QDQ models grafted with ``export --from``."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

from onnxcam import Explainer
from onnxcam.engine import Engine
from tests.conftest import EXAMPLES, ROOT
from tests.test_cli import RUNTIME_ONLY, assert_clean_failure, run, run_without
from tests.test_saliency import _tiny_classifier

torch = pytest.importorskip("torch")
sys.path.insert(0, str(ROOT / "scripts"))
from scenes import write_scenes  # noqa: E402


class _Random(CalibrationDataReader):
    def __init__(self, count: int) -> None:
        rng = np.random.default_rng(0)
        self._feeds = iter([{"x": rng.normal(0, 1, (1, 3, 20, 30)).astype(np.float32)} for _ in range(count)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def test_a_users_qdq_model_grafts_with_the_straight_through_gradient(tmp_path: Path) -> None:
    """ONNX Runtime's QDQ quantization puts Quantize/DequantizeLinear pairs all through the head; the grafted
    gradient equals torch autograd through the same fake-quantized head (same scales, zero points, weights)."""
    from onnxcam_export.from_onnx import graft_file

    _tiny_classifier(tmp_path / "tiny.onnx")
    quantize_static(tmp_path / "tiny.onnx", tmp_path / "tiny.qdq.onnx", _Random(4), quant_format=QuantFormat.QDQ,
                    per_channel=True)  # fmt: skip
    qdq = onnx.load(tmp_path / "tiny.qdq.onnx")
    ops = [n.op_type for n in qdq.graph.node]
    head = ops[ops.index("GlobalAveragePool") :]
    assert head.count("QuantizeLinear") == 3 and head.count("DequantizeLinear") == 3
    card, _ = graft_file(tmp_path / "tiny.qdq.onnx", tmp_path / "tiny.qdq.cam.onnx")
    assert card["layer"].startswith("r_DequantizeLinear_Output")
    engine = Engine(tmp_path / "tiny.qdq.cam.onnx")
    image = np.random.default_rng(2).integers(0, 256, (1, 20, 30, 3), dtype=np.uint8)
    out = engine.run(image, np.asarray([[0, 1]]), full_gradients=True)

    values = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}

    def fake_quant(x: torch.Tensor, name: str) -> torch.Tensor:
        zero = values[f"{name}_zero_point"]
        levels = np.iinfo(zero.dtype)
        return torch.fake_quantize_per_tensor_affine(
            x, float(values[f"{name}_scale"]), int(zero), levels.min, levels.max
        )

    fc = (values["fc_quantized"].astype(np.float64) - values["fc_zero_point"][:, None]) * values["fc_scale"][:, None]
    a = torch.from_numpy(out.activations.astype(np.float64)).requires_grad_()
    pooled = fake_quant(a.mean(dim=(2, 3)), "p")  # GlobalAveragePool; Flatten keeps [N, C]
    scores = fake_quant(fake_quant(pooled, "p") @ torch.from_numpy(fc).T, "scores")
    for t in range(2):
        (expected,) = torch.autograd.grad(scores[0, t], a, retain_graph=True)
        np.testing.assert_allclose(out.gradients[0, t], expected[0].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.logits[0], scores[0].detach().numpy(), rtol=1e-5, atol=1e-5)


def test_a_quantized_model_keeps_onnx_runtimes_weight_prepacking(tmp_path: Path) -> None:
    """The card says which graph runs integer kernels (read from the file before its session is built): that one
    pre-packs its weights, a float one does not, and a caller's own choice stands."""
    import onnxruntime as ort

    from onnxcam.engine import NO_PREPACKING, file_metadata
    from onnxcam_export.from_onnx import graft_file

    _tiny_classifier(tmp_path / "tiny.onnx")
    quantize_static(tmp_path / "tiny.onnx", tmp_path / "tiny.qdq.onnx", _Random(4), quant_format=QuantFormat.QDQ)
    prepacking = {}
    for name in ("tiny", "tiny.qdq"):
        card, _ = graft_file(tmp_path / f"{name}.onnx", tmp_path / f"{name}.cam.onnx")
        stored = {e.key: e.value for e in onnx.load(tmp_path / f"{name}.cam.onnx").metadata_props}
        assert file_metadata(tmp_path / f"{name}.cam.onnx") == stored
        assert stored["onnxcam.quantized"] == json.dumps(card["quantized"])
        session = Engine(tmp_path / f"{name}.cam.onnx").session
        prepacking[card["quantized"]] = session.get_session_options().get_session_config_entry(NO_PREPACKING)
    assert prepacking == {False: "1", True: "0"}
    options = ort.SessionOptions()
    options.add_session_config_entry(NO_PREPACKING, "1")
    chosen = Engine(tmp_path / "tiny.qdq.cam.onnx", session_options=options).session.get_session_options()
    assert chosen.get_session_config_entry(NO_PREPACKING) == "1"
    assert file_metadata(EXAMPLES / "chelsea.png") == {}


def test_the_first_depthwise_block_stays_float() -> None:
    """The first Conv with one group per channel and the Conv reading it through a Clip are kept in float; a
    grouped Conv with two channels per group is not depthwise, and a model without one keeps nothing more."""
    from onnx import TensorProto, helper

    from onnxcam_export.quantize import first_depthwise_block

    def conv(name: str, x: str, y: str, shape: list[int], group: int = 1) -> onnx.NodeProto:
        weights.append(numpy_helper.from_array(np.zeros(shape, np.float32), f"{name}.w"))
        return helper.make_node("Conv", [x, f"{name}.w"], [y], name=name, group=group)

    weights: list[onnx.TensorProto] = []
    nodes = [conv("stem", "x", "s", [8, 3, 3, 3]), conv("grouped", "s", "g", [8, 2, 3, 3], group=4),
             conv("dw", "g", "d", [8, 1, 3, 3], group=8), helper.make_node("Clip", ["d"], ["c"], name="clip"),
             conv("pw", "c", "p", [4, 8, 1, 1]), conv("dw2", "p", "y", [4, 1, 3, 3], group=4)]  # fmt: skip
    info = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [info("y", TensorProto.FLOAT, None)], weights)  # fmt: skip
    assert [n.name for n in first_depthwise_block(graph)] == ["dw", "pw"]
    del graph.node[1:]
    assert first_depthwise_block(graph) == []


def test_int8_head_weights_give_the_exact_gradient_of_the_dequantized_head(tmp_path: Path) -> None:
    """A Gemm head (alpha, beta, bias) becomes x @ DequantizeLinear(int8 levels, one scale per class) + beta * C,
    the levels read by that DequantizeLinear alone (what lets ONNX Runtime fuse it into an int8 kernel); the
    pre-summed channel weights, the full gradients and the head-only pass equal torch autograd through the
    dequantized head."""
    from onnx import TensorProto, helper

    from onnxcam_export.from_onnx import graft_file
    from onnxcam_export.quantize import quantize_file

    rng = np.random.default_rng(3)
    fc, bias = rng.normal(0, 0.4, (5, 4)).astype(np.float32), rng.normal(0, 0.1, 5).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "b"], ["scores"], transB=1, alpha=0.7, beta=1.3)]  # fmt: skip
    weights = {"w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "fc": fc, "b": bias}
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 20, 30])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "tiny.onnx")
    graft_file(tmp_path / "tiny.onnx", tmp_path / "tiny.cam.onnx")
    card, _ = quantize_file(tmp_path / "tiny.cam.onnx", EXAMPLES, tmp_path / "tiny.int8.onnx")
    assert card["weights_path"] == "presummed" and card["quantized"]

    graph = onnx.load(tmp_path / "tiny.int8.onnx").graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    (dequantize,) = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in values
                     and values[n.input[0]].shape == (4, 5)]  # fmt: skip
    levels, scale = values[dequantize.input[0]], values[dequantize.input[1]]
    assert levels.dtype == np.int8 and scale.shape == (5,)
    assert sum(name == dequantize.input[0] for n in graph.node for name in n.input) == 1
    dequantized = levels.astype(np.float64) * scale
    np.testing.assert_allclose(dequantized, 0.7 * fc.T, atol=scale.max() / 2 + 1e-7)

    engine = Engine(tmp_path / "tiny.int8.onnx")
    image = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    targets = np.asarray([[0, 3], [4, 1]])
    out = engine.run(image, targets, full_gradients=True)
    a = torch.from_numpy(out.activations.astype(np.float64)).requires_grad_()
    scores = a.mean(dim=(2, 3)) @ torch.from_numpy(dequantized) + torch.from_numpy(1.3 * bias.astype(np.float64))
    for n, t in np.ndindex(targets.shape):
        (expected,) = torch.autograd.grad(scores[n, targets[n, t]], a, retain_graph=True)
        np.testing.assert_allclose(out.gradients[n, t], expected[n].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out.weights[n, t], expected[n].numpy().mean(axis=(1, 2)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(engine.run_head(out.activations), scores.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_quantize_is_a_build_step_on_a_runtime_only_host(lite0_model: Path, tmp_path: Path) -> None:
    result = run_without(RUNTIME_ONLY, "quantize", str(lite0_model), "--calibrate", str(EXAMPLES))
    assert_clean_failure(result, "build step", "onnx package")


def test_quantize_refuses_a_calibration_folder_without_images(lite0_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    assert_clean_failure(run("quantize", str(lite0_model), "--calibrate", str(tmp_path), "--out", str(out)),
                         "holds no images")  # fmt: skip
    assert_clean_failure(run("quantize", str(lite0_model), "--calibrate", str(tmp_path / "none"), "--out", str(out)),
                         "is not a folder")  # fmt: skip
    assert not out.exists()


@pytest.mark.slow
def test_int8_lite0_runs_on_the_plain_runtime_and_keeps_the_maps(lite0_model: Path, tmp_path: Path) -> None:
    """Calibrated on 8 scenes, checked on 2 photos and 8 other scenes (benchmarks/int8.py measures 52)."""
    write_scenes(tmp_path / "calibration", 8, seed=1)
    scenes = write_scenes(tmp_path / "scenes", 8, seed=0)
    int8 = tmp_path / "lite0.int8.onnx"
    result = run("quantize", str(lite0_model), "--calibrate", str(tmp_path / "calibration"), "--out", str(int8))
    assert result.returncode == 0, result.stderr
    assert "INT8 (qdq" in result.stdout
    model = onnx.load(int8)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "QDQ: default-domain ONNX only"
    explained = run_without(RUNTIME_ONLY, "explain", str(EXAMPLES / "chelsea.png"), "--model", str(int8),
                            "--out", str(tmp_path / "maps"), "--json")  # fmt: skip
    assert explained.returncode == 0, explained.stderr
    assert json.loads(explained.stdout)["images"][0]["targets"][0]["label"] == "Egyptian cat"
    floats, quantized = Explainer(lite0_model), Explainer(int8)
    correlations = []
    for photo in [EXAMPLES / "chelsea.png", EXAMPLES / "coffee.png", *scenes]:
        reference = floats.explain(photo).maps[0]
        ours = quantized.explain(photo, targets=[reference.index]).maps[0]
        correlations.append(float(np.corrcoef(reference.cam.ravel(), ours.cam.ravel())[0, 1]))
    assert statistics.median(correlations) >= 0.95 and min(correlations) >= 0.85, correlations
