"""Score-CAM and Ablation-CAM (extra passes), the head-only graph, and test-time augmentation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam import Explainer
from onnxcam.engine import Engine, Outputs
from onnxcam.passes import ablation_weights, reciprocam_maps, score_weights
from onnxcam_export.from_onnx import graft_file
from onnxcam_export.graft import head_model
from tests.conftest import EXAMPLES


def build_tiny(folder: Path, flatten_by_reshape: bool = False) -> Path:
    """A small CNN (conv, relu, pool, conv, relu | GAP, FC to 5 classes), seeded weights, grafted.

    ``flatten_by_reshape`` flattens with Reshape [0, -1], as ``x.view(x.size(0), -1)`` exports,
    which ONNX Runtime cannot apply to an empty batch.
    """
    rng = np.random.default_rng(3)
    weights = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
        "w2": rng.normal(0, 0.3, (8, 8, 3, 3)), "b2": rng.normal(0, 0.1, 8),
        "fc": rng.normal(0, 0.5, (5, 8)), "fcb": rng.normal(0, 0.1, 5), "shape": np.array([0, -1]),
    }  # fmt: skip
    flatten = (
        helper.make_node("Reshape", ["g", "shape"], ["f"])
        if flatten_by_reshape
        else helper.make_node("Flatten", ["g"], ["f"])
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        flatten,
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["scores"], transB=1),
    ]
    initializers = [
        numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k) for k, v in weights.items()
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5])], initializers,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "tiny.onnx")
    graft_file(folder / "tiny.onnx", folder / "tiny.cam.onnx")
    return folder / "tiny.cam.onnx"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def _run(engine: Engine, image: np.ndarray, classes: list[int]) -> Outputs:
    return engine.run(image[None], np.array([classes]))


def test_head_only_graph_gives_the_full_graphs_logits(vgg16_model: Path, lite0_model: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    for model in (vgg16_model, lite0_model):
        engine = Engine(model)
        out = engine.run(images, np.zeros((2, 1), np.int64))
        np.testing.assert_array_equal(engine.run_head(out.activations), out.logits)


@pytest.mark.parametrize("reshape", [False, True], ids=["flatten", "reshape-0-minus-1"])
def test_ablation_weights_batched_equal_one_channel_at_a_time(reshape: bool, tmp_path: Path) -> None:
    """Reference: the head cut out of the file by onnx's Extractor, one ablated channel per run.

    A model that cannot take an empty image batch still works, feeding one blank image (and says so).
    """
    tiny_model = build_tiny(tmp_path, flatten_by_reshape=reshape)
    engine = Engine(tiny_model)
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    classes = [0, 3]
    out = _run(engine, image, classes)
    head = ort.InferenceSession(
        head_model(onnx.load(tiny_model)).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    a = out.activations[0]
    base = head.run(["logits"], {"activations": a[None]})[0][0, classes]
    expected = np.zeros((len(classes), a.shape[0]))
    for k in range(a.shape[0]):
        ablated = a.copy()
        ablated[k] = 0
        score = head.run(["logits"], {"activations": ablated[None]})[0][0, classes]
        expected[:, k] = (base - score) / base
    if reshape:
        with pytest.warns(UserWarning, match="cannot run an empty image batch"):
            got = ablation_weights(engine, image, a, np.array(classes), batch_size=3)
    else:
        got = ablation_weights(engine, image, a, np.array(classes), batch_size=3)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_score_weights_batched_equal_one_channel_at_a_time(tiny_model: Path) -> None:
    engine = Engine(tiny_model)
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    classes = [1, 4]
    a = _run(engine, image, classes).activations[0]
    scores = np.zeros((a.shape[0], len(classes)))
    for k, channel in enumerate(a):
        mask = cv2.resize(channel, (32, 32), interpolation=cv2.INTER_LINEAR).astype(np.float64)
        mask = (mask - mask.min()) / (mask.max() - mask.min()) if mask.max() > mask.min() else mask * 0
        masked = np.rint(image * mask[..., None]).astype(np.uint8)
        logits = _run(engine, masked, [0]).logits[0].astype(np.float64)
        scores[k] = (np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())[classes]
    expected = (np.exp(scores) / np.exp(scores).sum(axis=0)).T
    np.testing.assert_allclose(score_weights(engine, image, a, np.array(classes), batch_size=3), expected, rtol=1e-4)


def test_extra_pass_methods_through_the_api(tiny_model: Path) -> None:
    image = np.random.default_rng(4).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    result = Explainer(tiny_model).explain(image, targets=[2], method=["scorecam", "ablationcam"])
    assert [m.method for m in result.maps] == ["scorecam", "ablationcam"]
    assert all(m.cam.shape == (40, 50) and m.cam.max() <= 1 for m in result.maps)


def test_aug_smooth_commutes_with_a_horizontal_flip(lite0_model: Path) -> None:
    """The views (flip x brightness) are closed under flipping, so smoothing a mirrored photo
    gives the mirrored smoothed map; and smoothing does change the map."""
    explainer = Explainer(lite0_model)
    photo = cv2.cvtColor(cv2.imread(str(EXAMPLES / "chelsea.png")), cv2.COLOR_BGR2RGB)
    photo = cv2.resize(photo, (224, 224), interpolation=cv2.INTER_AREA)
    smooth = explainer.explain(photo, targets=[285], aug_smooth=True).maps[0].cam_lowres
    mirrored = explainer.explain(np.ascontiguousarray(photo[:, ::-1]), targets=[285], aug_smooth=True).maps[0]
    np.testing.assert_allclose(mirrored.cam_lowres[:, ::-1], smooth, atol=1e-5)
    plain = explainer.explain(photo, targets=[285]).maps[0].cam_lowres
    assert not np.allclose(smooth, plain / plain.max(), atol=1e-3)


def test_reciprocam_batched_equals_one_location_at_a_time(tiny_model: Path) -> None:
    """Reference: the head cut out of the file by onnx's Extractor, one mosaic (one location kept) per run, the
    class's softmax probability at that location."""
    engine = Engine(tiny_model)
    image = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    classes = [2, 0]
    a = _run(engine, image, classes).activations[0]
    head = ort.InferenceSession(
        head_model(onnx.load(tiny_model)).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    _, height, width = a.shape
    expected = np.zeros((len(classes), height, width))
    for i in range(height):
        for j in range(width):
            mosaic = np.zeros_like(a)
            mosaic[:, i, j] = a[:, i, j]
            logits = head.run(["logits"], {"activations": mosaic[None]})[0][0].astype(np.float64)
            expected[:, i, j] = (np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())[classes]
    got = reciprocam_maps(engine, image, a, np.array(classes), batch_size=7)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.ptp(got[0]) > 0, "a map that varies over the grid"
    result = Explainer(tiny_model).explain(image, targets=classes, method="reciprocam")
    assert [m.method for m in result.maps] == ["reciprocam"] * 2
