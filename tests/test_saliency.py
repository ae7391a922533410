"""The ``saliency`` output: the graph's own finished map against the Python path (cv2 resize, numpy min-max)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam import Explainer, contract, methods
from onnxcam.errors import OnnxcamError
from onnxcam.image import read_rgb, resize_rgb
from tests.conftest import EXAMPLES

TOLERANCE = 1e-5  # max abs difference of two [0, 1] maps


def assert_saliency_matches_python(model: Path, image: np.ndarray | None = None) -> None:
    """Every in-graph method's ``saliency`` equals :meth:`Explainer.explain`'s map of the same image at the
    model's input size (so the Python path's upsampling goes to that size), for 3 targets in one call."""
    explainer = Explainer(model)
    size = explainer.card.input_size
    assert list(explainer.card.saliency_methods) == methods.in_graph()
    photo = resize_rgb(read_rgb(EXAMPLES / "chelsea.png"), size) if image is None else image
    last = len(explainer.labels) - 1  # a low-ranked class, and the top 2
    codes = explainer.target_codes([last], top_k=2)
    for name in explainer.card.saliency_methods:
        out = explainer.engine.run(photo[None], np.asarray([codes]), saliency=name)
        reference = explainer.explain(photo, targets=[last], top_k=2, method=name)
        assert out.saliency.shape == (1, 3, *size) and out.saliency.dtype == np.float32
        assert list(out.target_classes[0]) == [m.index for m in reference.maps]
        for t, expected in enumerate(reference.maps):
            difference = float(np.abs(out.saliency[0, t] - expected.cam).max())
            assert difference <= TOLERANCE, f"{model.name} {name} target {expected.index}: {difference}"


@pytest.mark.parametrize("fixture", ["lite0_model", pytest.param("vgg16_model", marks=pytest.mark.slow)])
def test_saliency_equals_the_python_map(fixture: str, request: pytest.FixtureRequest) -> None:
    assert_saliency_matches_python(request.getfixturevalue(fixture))


def test_saliency_is_empty_and_gradients_unbuilt_unless_asked(lite0_model: Path) -> None:
    explainer = Explainer(lite0_model)
    image = resize_rgb(read_rgb(EXAMPLES / "coffee.png"), explainer.card.input_size)[None]
    feeds = {"image": image, "targets": np.asarray([[-1, -2]]), "return_saliency": np.asarray(False),
             "saliency_method": np.asarray(0)}  # fmt: skip
    plain = explainer.engine.session.run(None, feeds)
    by_name = dict(zip([o.name for o in explainer.engine.session.get_outputs()], plain, strict=True))
    assert by_name[contract.SALIENCY].shape == (1, 2, 0, 0)
    assert by_name[contract.GRADIENTS].shape[3:] == (0, 0)
    assert explainer.engine.run(image, np.asarray([[-1]]), saliency="gradcam").gradients.shape[3:] == (0, 0)
    full = explainer.engine.run(image, np.asarray([[-1]]), saliency="layercam").gradients
    assert full.shape[3:] == (7, 7), "a method that needs the full gradient builds it for that call"


def test_saliency_nodes_all_sit_behind_the_flag(lite0_model: Path) -> None:
    """ONNX Runtime runs every node of the main graph: the map's work must be inside the If."""
    graph = onnx.load(lite0_model, load_external_data=False).graph
    outside = [n.op_type for n in graph.node if any("saliency" in name for name in [*n.input, *n.output])]
    assert sorted(outside) == ["And", "Gather", "If"], outside  # the flag logic, and the If itself


def _tiny_classifier(path: Path) -> None:
    """Conv 3->4 + ReLU, global pool, FC to 2 classes: class 1 weighs every channel negatively (ReLU'd map = 0)."""
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "fc": np.stack([np.full(4, 0.5), np.full(4, -0.5)]).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["scores"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 20, 30])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def test_an_all_zero_map_stays_zero_and_a_rectangular_input_works(tmp_path: Path) -> None:
    from onnxcam_export.from_onnx import graft_file

    _tiny_classifier(tmp_path / "tiny.onnx")
    graft_file(tmp_path / "tiny.onnx", tmp_path / "tiny.cam.onnx")
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    explainer = Explainer(tmp_path / "tiny.cam.onnx")
    for name in explainer.card.saliency_methods:
        out = explainer.engine.run(image[None], np.asarray([[0, 1]]), saliency=name)
        assert not np.isnan(out.saliency).any()
        assert out.saliency[0, 0].max() == 1.0 and out.saliency[0, 0].min() == 0.0
        assert (out.saliency[0, 1] == 0).all(), f"{name}: no location supports class 1"
    assert_saliency_matches_python(tmp_path / "tiny.cam.onnx", image)


def test_a_method_the_graph_lacks_is_one_clear_error(lite0_model: Path) -> None:
    engine = Explainer(lite0_model).engine
    image = np.zeros((1, *engine.card.input_size, 3), np.uint8)
    with pytest.raises(OnnxcamError, match="cannot compute the eigencam map in the graph"):
        engine.run(image, np.asarray([[-1]]), saliency="eigencam")


def test_the_in_graph_methods_are_the_flagged_records() -> None:
    from onnxcam_export.saliency import EMIT, saliency_methods

    assert saliency_methods() == [name for name, m in methods.METHODS.items() if m.in_graph]
    assert set(EMIT) == set(saliency_methods()), "an ONNX form for each flagged method, and no other"
    assert {"gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"} <= set(saliency_methods())
