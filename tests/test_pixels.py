"""The backward to the input (``export --pixels``): the explained scores' gradient at the model's float input,
after its in-graph normalisation (where Captum takes its input), from the same call as the CAM, against torch
autograd in float64; a CAM call builds none of it, and an op without a rule on the way is refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam.engine import Engine
from onnxcam.errors import OnnxcamError
from onnxcam_export.from_onnx import Preprocessing, graft_file
from tests.conftest import random_images

torch = pytest.importorskip("torch")
nn = torch.nn
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET = Preprocessing.create(None, MEAN, STD, False)
SIZE = (32, 32)
TOL = 1e-4


class Small(nn.Module):
    """Conv-BN-ReLU, a max pool, conv-ReLU (the target layer), a residual conv, average pool, linear: 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU())
        self.skip = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.block(self.stem(x))
        return self.fc((a + torch.tanh(self.skip(a))).mean((2, 3)))


def as_normalised(batch: np.ndarray, mean: tuple = MEAN, std: tuple = STD) -> torch.Tensor:
    """The model's input from uint8 RGB ``[N, H, W, 3]``, as onnxcam's preprocessing and a torchvision pipeline."""
    x = torch.from_numpy(batch / 255.0).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(std).double().view(1, 3, 1, 1)


def input_gradients(model: nn.Module, batch: np.ndarray, classes: np.ndarray, mean: tuple = MEAN,
                    std: tuple = STD) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(the normalised input, d logit_c / d input ``[N, T, 3, H, W]``) by autograd in float64."""
    x = as_normalised(batch, mean, std).requires_grad_(True)
    logits = model.double()(x)
    rows = [torch.autograd.grad(logits.gather(1, torch.from_numpy(classes[:, [t]])).sum(), x, retain_graph=True)[0]
            for t in range(classes.shape[1])]  # fmt: skip
    return x.detach().numpy(), torch.stack(rows, 1).numpy()


def assert_close(found: np.ndarray, expected: np.ndarray) -> None:
    """Relative to the largest magnitude per target row (as the target-layer gradient tests)."""
    for n in range(len(expected)):
        for t in range(expected.shape[1]):
            assert np.abs(found[n, t] - expected[n, t]).max() / np.abs(expected[n, t]).max() < TOL, (n, t)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    from tests.test_transformers import export_plain

    torch.manual_seed(0)
    model = Small().eval()
    with torch.no_grad():  # (a BatchNorm with statistics that are not the identity)
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("pixels")
    export_plain(model, SIZE, folder / "small.onnx", dynamo=False)
    graft_file(folder / "small.onnx", folder / "small.cam.onnx", prep=IMAGENET, pixels=True)
    return model, folder / "small.cam.onnx"


def test_the_input_gradient_of_each_target_equals_autograd_from_the_cams_call(small: tuple) -> None:
    model, path = small
    batch, classes = random_images(2, seed=1, size=SIZE[0]), np.array([[0, 3], [4, 1]])
    out = Engine(path).run(batch, classes, pixels=True)
    x, expected = input_gradients(model, batch, classes)
    np.testing.assert_allclose(out.pixels, x, rtol=1e-5, atol=1e-5)
    assert out.pixel_gradients.shape == (2, 2, 3, *SIZE)
    assert_close(out.pixel_gradients, expected)
    assert out.weights.shape == (2, 2, 16), "the CAM's weights come from the same call"


def test_a_cam_call_builds_no_input_gradient_and_a_cam_only_file_has_none(small: tuple, tmp_path: Path) -> None:
    _, path = small
    out = Engine(path).run(random_images(1, size=SIZE[0]), np.array([[0, 1, 2]]))
    assert out.pixel_gradients.shape == (1, 3, 0, 0, 0)
    graft_file(path.with_name("small.onnx"), tmp_path / "cam.onnx", prep=IMAGENET)
    plain = Engine(tmp_path / "cam.onnx")
    assert plain.run(random_images(1, size=SIZE[0]), np.array([[0]])).pixel_gradients is None
    with pytest.raises(OnnxcamError, match="export it again with --pixels"):
        plain.run(random_images(1, size=SIZE[0]), np.array([[0]]), pixels=True)
    from onnxcam import pixels

    for attribute in (pixels.integrated_gradients, pixels.smoothgrad):  # (it was a TypeError on a missing output)
        with pytest.raises(OnnxcamError, match=r"has no backward to its input.*export it again with --pixels"):
            attribute(plain, random_images(1, size=SIZE[0])[0], np.array([0]))


def test_an_op_without_a_rule_before_the_target_layer_is_refused_by_name_only_with_pixels(tmp_path: Path) -> None:
    """Trilu (no rule) between the input and the layer: a CAM file needs no gradient there, --pixels does."""
    rng = np.random.default_rng(0)
    weights = {"w": rng.normal(0, 0.5, (8, 3, 3, 3)), "fc": rng.normal(0, 1, (8, 4))}
    nodes = [helper.make_node("Trilu", ["x"], ["t"], name="odd_op"),
             helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["features"]),
             helper.make_node("GlobalAveragePool", ["features"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("MatMul", ["flat", "fc"], ["scores"])]  # fmt: skip
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4])]
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    graft_file(tmp_path / "m.onnx", tmp_path / "cam.onnx", prep=IMAGENET)
    with pytest.raises(OnnxcamError, match=r"to the model's input \(--pixels\): .*Trilu.*'odd_op'"):
        graft_file(tmp_path / "m.onnx", tmp_path / "pixels.onnx", prep=IMAGENET, pixels=True)
    assert not (tmp_path / "pixels.onnx").exists()


def test_a_vits_input_gradient_equals_autograd(tmp_path: Path) -> None:
    """A ViT (patch embedding, attention, LayerNorm, GELU, the class token's head), target layer automatic: the
    pick of the class token before the last MLP leaves the backward to the input exact."""
    from onnxcam_export.transformers import VisionTransformer
    from tests.test_transformers import export_plain

    torch.manual_seed(0)
    model = VisionTransformer((32, 48), 8, 32, 2, 2, 5).eval()
    export_plain(model, (32, 48), tmp_path / "vit.onnx", dynamo=False)
    graft_file(tmp_path / "vit.onnx", tmp_path / "vit.cam.onnx", prep=IMAGENET, pixels=True)
    batch = np.random.default_rng(3).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    classes = np.array([[0, 4], [2, 1]])
    out = Engine(tmp_path / "vit.cam.onnx").run(batch, classes, pixels=True)
    _, expected = input_gradients(model, batch, classes)
    assert_close(out.pixel_gradients, expected)


def _branch(graph: onnx.GraphProto, node_name: str) -> onnx.GraphProto:
    node = next(n for n in graph.node if n.name == node_name)
    return next(a.g for a in node.attribute if a.name == "then_branch")


def test_the_backwards_constants_live_in_the_branches_that_read_them(small: tuple) -> None:
    """ONNX Runtime lays out only a Conv whose weight is its own graph's initializer (see the Lite0 test below):
    the flipped kernels of the backward's convolutions are in each backward's ``If`` branch, none in the main
    graph, and no main-graph initializer is read by the branches alone."""
    _, path = small
    graph = onnx.load(path).graph
    for name in ("pixel_gradients", "guided_gradients"):
        local = {t.name for t in _branch(graph, name).initializer}
        convs = [n for n in _branch(graph, name).node if n.op_type == "Conv"]
        assert convs and all(n.input[1] in local for n in convs), name
    outer = {i for n in graph.node if n.op_type != "If" for i in n.input} | {v.name for v in graph.input}
    assert {t.name for t in graph.initializer} <= outer | {o.name for o in graph.output}
    out = Engine(path).run(random_images(1, size=SIZE[0]), np.array([[2]]), pixels=True, guided=True)
    assert np.abs(out.pixel_gradients).max() > 0 and np.abs(out.guided_gradients).max() > 0


def test_a_constant_a_loop_body_reads_too_stays_in_the_main_graph() -> None:
    """Only constants that nothing but ``If`` branches read move in: one that a Loop's body also reads (from the
    outer scope, not as a node input) stays, and the graph still runs."""
    import onnxruntime as ort

    from onnxcam_export.save import _branch_constants

    def branch(op: str, name: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["x", name], [f"{name}_{op}"])], op, [],
                                 [helper.make_tensor_value_info(f"{name}_{op}", TensorProto.FLOAT, [2])])  # fmt: skip

    body = helper.make_graph(
        [helper.make_node("Identity", ["keep"], ["keep_out"]), helper.make_node("Add", ["total", "shared"], ["next"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("keep", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("total", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("keep_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("next", TensorProto.FLOAT, [2])])  # fmt: skip
    nodes = [helper.make_node("If", ["flag"], ["a"], then_branch=branch("Add", "shared"),
                              else_branch=branch("Sub", "only")),
             helper.make_node("Loop", ["count", "", "x"], ["b"], body=body)]  # fmt: skip
    constants = {"shared": np.array([1.0, 2.0], np.float32), "only": np.array([3.0, 4.0], np.float32),
                 "count": np.array(3, np.int64)}  # fmt: skip
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                     helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "ab"],
        [numpy_helper.from_array(v, k) for k, v in constants.items()])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _branch_constants(model.graph)
    assert {t.name for t in model.graph.initializer} == {"shared", "count"}
    local = {a.name: [t.name for t in a.g.initializer] for a in model.graph.node[0].attribute}
    assert local == {"then_branch": [], "else_branch": ["only"]}
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([10.0, 20.0], np.float32)
    for flag, expected in ((True, x + constants["shared"]), (False, x - constants["only"])):
        a, b = session.run(None, {"x": x, "flag": np.asarray(flag)})
        np.testing.assert_array_equal(a, expected)
        np.testing.assert_array_equal(b, x + 3 * constants["shared"])


@pytest.mark.slow
def test_lite0s_backward_convolutions_run_in_onnx_runtimes_blocked_layout(lite0_pixels: Path, tmp_path: Path) -> None:
    """ONNX Runtime's optimised graph: every Conv of the backward to the input is its NCHWc kernel, as the
    forward's are (with the kernels read from the outer scope none was, and the backward's convolutions took twice
    as long)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(lite0_pixels), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(tmp_path / "optimised.onnx").graph
    blocked = ("com.microsoft.nchwc", "Conv")
    if not any((n.domain, n.op_type) == blocked for n in graph.node):
        pytest.skip("this CPU has no NCHWc kernels in ONNX Runtime (its forward has none either)")
    kinds = [(n.domain, n.op_type) for n in _branch(graph, "pixel_gradients").node]
    assert kinds.count(blocked) >= 40 and ("", "Conv") not in kinds, kinds


@pytest.fixture(scope="module")
def lite0_pixels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0 with its ImageNet weights, exported natively with --pixels."""
    from onnxcam_export.torch_export import export_arch

    path = tmp_path_factory.mktemp("lite0") / "lite0.onnx"
    export_arch("efficientnet_lite0", "imagenet", None, path, pixels=True)
    return path


def lite0_torch() -> nn.Module:
    from onnxcam_export.torch_export import ARCHS, RANDOM_SEED, load_weights

    torch.manual_seed(RANDOM_SEED)
    model = ARCHS["efficientnet_lite0"].build().eval()
    load_weights(ARCHS["efficientnet_lite0"], model, "imagenet")
    return model


@pytest.mark.slow
def test_lite0s_integrated_gradients_converge_to_completeness(lite0_pixels: Path) -> None:
    """The bundled cat, black baseline, its top class: |sum(attr) - (f(x) - f(0))| / |f(x) - f(0)| shrinks with
    the steps, to <= 1% at 256 Gauss-Legendre steps (measured: 42% at 32, 4.3% at 64, 1.8% at 128, 0.83% at 256;
    Captum's own convergence delta is the same, tests/test_captum.py)."""
    from onnxcam import pixels
    from onnxcam.image import read_rgb, resize_rgb
    from tests.conftest import EXAMPLES

    engine = Engine(lite0_pixels)
    cat = resize_rgb(read_rgb(EXAMPLES / "chelsea.png"), engine.card.input_size)
    errors = [pixels.integrated_gradients(engine, cat, np.array([285]), steps=n).completeness[0] for n in (64, 256)]
    assert errors[1] < errors[0] and errors[1] <= 0.01, errors


@pytest.mark.slow
@pytest.mark.parametrize(("name", "weights"), [("efficientnet_lite0", "imagenet"), ("vgg16", "none")])
def test_a_native_exports_input_gradient_equals_autograd(tmp_path: Path, name: str, weights: str) -> None:
    """EfficientNet-Lite0 with its ImageNet weights and VGG16 (seeded random weights: no download here), exported
    natively with --pixels: the input gradients of two classes against float64 autograd. VGG16 explains the cat:
    on a photo of uniform noise its ReLUs and max pools meet values that float32 and float64 resolve differently
    (units near zero, windows with near-equal largest values: 5-8% of the gradient's elements then move by up to 2%
    of its largest); on the cat the two agree to 6e-7."""
    from onnxcam.image import read_rgb, resize_rgb
    from onnxcam_export.torch_export import ARCHS, RANDOM_SEED, export_arch, load_weights
    from tests.conftest import EXAMPLES

    export_arch(name, weights, None, tmp_path / "model.onnx", pixels=True)
    arch = ARCHS[name]
    torch.manual_seed(RANDOM_SEED)
    model = arch.build().eval()
    load_weights(arch, model, weights)
    cat = resize_rgb(read_rgb(EXAMPLES / "chelsea.png"), arch.input_size)[None]
    batch, classes = cat if name == "vgg16" else random_images(1, seed=2), np.array([[285, 281]])
    out = Engine(tmp_path / "model.onnx").run(batch, classes, pixels=True)
    x, expected = input_gradients(model, batch, classes, arch.mean, arch.std)  # (Lite0's: (pixel - 127) / 128)
    np.testing.assert_allclose(out.pixels, x, rtol=1e-5, atol=1e-5)
    assert_close(out.pixel_gradients, expected)


def test_a_detectors_box_score_gradient_at_the_input_equals_autograd(tmp_path: Path) -> None:
    """A detector's targets are boxes (anchor, class): the gradient of each kept box's score at the input."""
    from tests import test_detect as detect

    torch.manual_seed(0)
    model = detect.TinyDetector(detect.CLASSES)
    path, _ = detect.grafted(model, tmp_path, pixels=True)
    images = detect._images(2, seed=5)
    anchors, classes = np.array([[3, 70], [79, 12]]), np.array([[0, 2], [1, 0]])
    out = Engine(path).run(images, classes * detect.ANCHORS + anchors, thresholds={"conf_threshold": 0.0},
                           pixels=True)  # fmt: skip
    x = detect._as_input(images).requires_grad_(True)
    raw = model.double()(x)
    n = torch.arange(2)[:, None]
    scores = raw[n, 4 + torch.from_numpy(out.target_classes), torch.from_numpy(out.box_anchors)]
    expected = torch.stack([torch.autograd.grad(scores[:, t].sum(), x, retain_graph=True)[0] for t in range(2)], 1)
    assert_close(out.pixel_gradients, expected.numpy())


def test_integrated_gradients_of_a_detectors_boxes_equal_the_formula_by_autograd(tmp_path: Path) -> None:
    """explain --method integrated-gradients on a detector: each kept box's score (its class at its anchor, the
    same row at every point of the path) integrated from a black photo, against the sum by autograd; the
    completeness error is the file's own scores' change."""
    from onnxcam import pixels
    from onnxcam.api import Explainer
    from tests import test_detect as detect

    torch.manual_seed(0)
    model = detect.TinyDetector(detect.CLASSES)
    path, _ = detect.grafted(model, tmp_path, pixels=True)
    photo = detect._images(1, seed=5)[0]
    steps = 8
    found = Explainer(path).explain(photo, method="integrated-gradients", conf=0.0,
                                    attribution=pixels.Settings(steps=steps))  # fmt: skip
    assert len(found.maps) >= 2 and all(m.box is not None for m in found.maps)
    out = Engine(path).run(photo[None], np.array([[-1, -2]]), thresholds={"conf_threshold": 0.0})
    codes = out.target_classes[0] * detect.ANCHORS + out.box_anchors[0]
    ours = pixels.integrated_gradients(Engine(path), photo, codes, steps=steps)
    alphas, sizes = pixels.quadrature(steps)
    x = detect._as_input(photo[None])
    total = torch.zeros(2, *x.shape[1:], dtype=torch.float64)
    for alpha, size in zip(alphas, sizes, strict=True):
        point = (alpha * x).requires_grad_(True)  # (the black baseline's input is 0: the model takes pixel / 255)
        raw = model.double()(point)
        for t, (c, a) in enumerate(zip(out.target_classes[0], out.box_anchors[0], strict=True)):
            total[t] += size * torch.autograd.grad(raw[0, 4 + c, a], point, retain_graph=True)[0][0]
    expected = (total * x[0]).numpy()
    assert_close(ours.values[None], expected[None])
    with torch.no_grad():
        change = [float(model(x)[0, 4 + c, a] - model(0 * x)[0, 4 + c, a])
                  for c, a in zip(out.target_classes[0], out.box_anchors[0], strict=True)]  # fmt: skip
    np.testing.assert_allclose(ours.completeness, np.abs(expected.reshape(2, -1).sum(1) - change) / np.abs(change),
                               atol=1e-4)  # fmt: skip
    assert [m.completeness for m in found.maps[:2]] == pytest.approx(ours.completeness, abs=1e-6)
    np.testing.assert_allclose(found.maps[0].attribution, expected[0].sum(0), atol=1e-4 * np.abs(expected[0]).max())


def test_a_segmenters_class_score_gradient_at_the_input_equals_autograd(tmp_path: Path) -> None:
    """A segmenter's score of class c is the sum of its logits over the pixels predicted as c (the argmax mask is
    constant almost everywhere): its gradient at the input, per class, against float64 autograd."""
    from tests import test_detect as detect

    torch.manual_seed(2)
    model = detect.TinySegmenter().eval()
    with torch.no_grad():  # (a classifier that splits the photo between several classes)
        model.classifier.bias.zero_()
        model.classifier.weight.mul_(10)
        torch.onnx.export(model, (torch.zeros(1, 3, detect.SIZE, detect.SIZE),), tmp_path / "seg.onnx",
                          dynamo=False, input_names=["x"], output_names=["out"], dynamic_axes={"x": {0: "n"}},
                          opset_version=17)  # fmt: skip
    graft_file(tmp_path / "seg.onnx", tmp_path / "seg.cam.onnx", prep=detect.UNIT, pixels=True)
    images = detect._images(2, seed=8)
    x = detect._as_input(images).requires_grad_(True)
    counts = np.stack([np.bincount(m.ravel(), minlength=4) for m in model.double()(x).argmax(1).numpy()])
    classes = np.argsort(-counts, axis=1, kind="stable")[:, :2]  # (each image's two classes with most pixels)
    assert (np.take_along_axis(counts, classes, 1) > 0).all()
    out = Engine(tmp_path / "seg.cam.onnx").run(images, classes, pixels=True)
    scores = detect.segment_scores(model.double()(x), classes)
    expected = torch.stack([torch.autograd.grad(scores[:, t].sum(), x, retain_graph=True)[0] for t in range(2)], 1)
    assert_close(out.pixel_gradients, expected.numpy())


def test_a_file_with_pixels_runs_every_method_as_a_cam_only_file(small: tuple, tmp_path: Path) -> None:
    """The same maps as the CAM-only file of the same model, for the gradient methods and the head-only passes
    (Score-CAM runs the head alone)."""
    from onnxcam.api import Explainer

    _, path = small
    graft_file(path.with_name("small.onnx"), tmp_path / "cam.onnx", prep=IMAGENET)
    photo = random_images(1, seed=7, size=SIZE[0])[0]
    for method in ("gradcam", "scorecam"):
        ours, theirs = (Explainer(p).explain(photo, method=method, top_k=2) for p in (path, tmp_path / "cam.onnx"))
        for a, b in zip(ours.maps, theirs.maps, strict=True):
            np.testing.assert_allclose(a.cam, b.cam, atol=1e-5)


def test_the_pixel_methods_maps_are_their_formulas_on_the_calls_outputs(small: tuple) -> None:
    """explain --method saliency / gradient-x-input: max_c |dS/dx_c| and the positive part of sum_c x_c dS/dx_c,
    at the input's resolution, from the autograd gradients, clipped at their 99th percentile (the pixel methods'
    default); the float maps before the ReLU are kept beside them (gradient x input signed)."""
    from onnxcam import maps
    from onnxcam.api import Explainer

    model, path = small
    photo = random_images(1, seed=4, size=SIZE[0])[0]
    found = Explainer(path).explain(photo, method=["saliency", "gradient-x-input"], targets=[1, 3])
    x, g = input_gradients(model, photo[None], np.array([[1, 3]]))
    formulas = {"saliency": np.abs(g[0]).max(axis=1), "gradient-x-input": np.maximum((g[0] * x[0]).sum(axis=1), 0)}
    signed = {"saliency": np.abs(g[0]).max(axis=1), "gradient-x-input": (g[0] * x[0]).sum(axis=1)}
    for m in found.maps:
        expected, _ = maps.finish(formulas[m.method][[1, 3].index(m.index)], SIZE, percentile=99)
        np.testing.assert_allclose(m.cam, expected, atol=1e-3)
        raw = signed[m.method][[1, 3].index(m.index)]
        np.testing.assert_allclose(m.attribution, raw, atol=1e-4 * np.abs(raw).max())
    assert (found.maps[-1].attribution < 0).any(), "gradient x input keeps its sign"
    assert {m.method for m in found.maps} == set(formulas)


def test_a_pixel_method_on_a_file_without_pixels_is_one_line(small: tuple, tmp_path: Path) -> None:
    from tests.test_cli import assert_clean_failure, run

    _, path = small
    graft_file(path.with_name("small.onnx"), tmp_path / "cam.onnx", prep=IMAGENET)
    import cv2

    cv2.imwrite(str(tmp_path / "p.png"), random_images(1, size=SIZE[0])[0])
    result = run("explain", str(tmp_path / "p.png"), "--model", str(tmp_path / "cam.onnx"), "--method", "saliency",
                 "--out", str(tmp_path / "out"))  # fmt: skip
    assert_clean_failure(result, "needs the model output 'pixel_gradients'", "--pixels")


def test_export_pixels_then_explain_saliency_on_the_command_line(small: tuple, tmp_path: Path) -> None:
    import json

    import cv2

    from tests.test_cli import run

    _, path = small
    made = run("export", "--from", str(path.with_name("small.onnx")), "--mean", *map(str, MEAN), "--std",
               *map(str, STD), "--pixels", "--out", str(tmp_path / "px.onnx"))  # fmt: skip
    assert made.returncode == 0, made.stderr
    cv2.imwrite(str(tmp_path / "p.png"), random_images(1, seed=9, size=SIZE[0])[0])
    shown = run("explain", str(tmp_path / "p.png"), "--model", str(tmp_path / "px.onnx"), "--method",
                "saliency,gradcam", "--top-k", "1", "--out", str(tmp_path / "out"), "--json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    targets = json.loads(shown.stdout)["images"][0]["targets"]
    assert [t["method"] for t in targets] == ["saliency", "gradcam"]
    assert np.load(targets[0]["map"]).shape == SIZE and Path(targets[0]["overlay"]).is_file()


def torch_integrated_gradients(model: nn.Module, batch: np.ndarray, baseline: np.ndarray, classes: np.ndarray,
                               alphas: np.ndarray, sizes: np.ndarray) -> np.ndarray:  # fmt: skip
    """``(x - x') * sum_s w_s dlogit/dx`` at each interpolated input, by autograd in float64: ``[T, C, H, W]``."""
    x, reference = as_normalised(batch[None])[0], as_normalised(baseline[None])[0]
    total = torch.zeros(len(classes), *x.shape, dtype=torch.float64)
    for alpha, size in zip(alphas, sizes, strict=True):
        point = (reference + alpha * (x - reference))[None].requires_grad_(True)
        logits = model.double()(point)
        for t, c in enumerate(classes):
            total[t] += size * torch.autograd.grad(logits[0, c], point, retain_graph=True)[0][0]
    return (total * (x - reference)).numpy()


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_equal_the_formula_by_autograd_and_are_complete(small: tuple, rule: str) -> None:
    """Several interpolation steps per call (chunks of 5 rows): the attribution equals the sum computed by torch
    at each point; with 64 Gauss-Legendre steps, sum(attribution) = f(x) - f(x') within 1% (the trapezoid rule
    converges slower over this model's ReLU and max-pool kinks: 2% and 5% here at 64 steps)."""
    from onnxcam import pixels

    model, path = small
    engine = Engine(path)
    photo, grey = random_images(1, seed=6, size=SIZE[0])[0], np.full((*SIZE, 3), 128, np.uint8)
    classes = np.array([2, 4])
    found = pixels.integrated_gradients(engine, photo, classes, baseline=grey, steps=12, rule=rule, chunk=5)
    alphas, sizes = pixels.quadrature(12, rule)
    expected = torch_integrated_gradients(model, photo, grey, classes, alphas, sizes)
    assert_close(found.values[None], expected[None])
    if rule == "gausslegendre":
        complete = pixels.integrated_gradients(engine, photo, classes, baseline=grey, steps=64, rule=rule)
        assert (complete.completeness <= 0.01).all(), complete.completeness


def test_smoothgrad_is_the_mean_gradient_over_its_noisy_inputs(small: tuple) -> None:
    from onnxcam import pixels

    model, path = small
    engine = Engine(path)
    photo, classes = random_images(1, seed=8, size=SIZE[0])[0], np.array([0, 1])
    found = pixels.smoothgrad(engine, photo, classes, samples=6, chunk=4)
    squared = pixels.smoothgrad(engine, photo, classes, samples=6, squared=True)
    inputs = torch.from_numpy(pixels.noise_samples(engine, photo, samples=6)).double().requires_grad_(True)
    logits = model.double()(inputs)
    rows = torch.stack([torch.autograd.grad(logits[:, c].sum(), inputs, retain_graph=True)[0] for c in classes], 1)
    assert_close(found.values[None], rows.mean(0).numpy()[None])
    assert_close(squared.values[None], (rows**2).mean(0).numpy()[None])


class GuidedReLU(torch.autograd.Function):
    """Guided Backpropagation's ReLU (Springenberg et al.): the forward's, and a backward that passes only the
    positive gradients where the input was positive; ``top`` bounds it as ReLU6 (passing inside (0, 6))."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, top: float | None = None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.top = top
        return x.clamp(0, top)

    @staticmethod
    def backward(ctx: object, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        inside = (x > 0) & (x < ctx.top) if ctx.top is not None else x > 0
        return dy.clamp(min=0) * inside, None


class Guided(nn.Module):
    """A ReLU, a ReLU6 (Clip from 0: guided too), a hardtanh (Clip from -1: its plain rule) and a max pool."""

    def __init__(self, guided: bool = False) -> None:
        super().__init__()
        self.guided = guided
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 16, 3, 1, 1)
        self.fc = nn.Linear(16, 4)

    def relu(self, x: torch.Tensor, top: float | None = None) -> torch.Tensor:
        if self.guided:
            return GuidedReLU.apply(x, top)
        return torch.relu(x) if top is None else x.clamp(0, top)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.relu(self.a(x)), 2)
        x = torch.nn.functional.hardtanh(self.relu(self.b(x), 6.0) - 1.0)
        return self.fc(self.relu(self.c(x)).mean((2, 3)))


def test_the_guided_backward_equals_autograd_with_guided_relus_beside_the_plain_one(tmp_path: Path) -> None:
    """Guided Backpropagation's gradient at the input (its ReLUs and ReLU6s pass only positive gradients where
    their input was positive; the Clip from -1 keeps its rule) equals float64 autograd through guided ReLUs, and
    the plain gradient of the same call stays autograd's plain one."""
    from tests.test_transformers import export_plain

    torch.manual_seed(3)
    model = Guided().eval()
    export_plain(model, SIZE, tmp_path / "g.onnx", dynamo=False)
    graft_file(tmp_path / "g.onnx", tmp_path / "g.cam.onnx", prep=IMAGENET, pixels=True)
    ops = {n.op_type for n in onnx.load(tmp_path / "g.onnx").graph.node}
    assert {"Relu", "Clip", "MaxPool"} <= ops, ops
    batch, classes = random_images(2, seed=6, size=SIZE[0]), np.array([[0, 2], [3, 1]])
    engine = Engine(tmp_path / "g.cam.onnx")
    out = engine.run(batch, classes, pixels=True, guided=True)
    guided = Guided(guided=True).eval()
    guided.load_state_dict(model.state_dict())
    _, plain = input_gradients(model, batch, classes)
    _, expected = input_gradients(guided, batch, classes)
    assert np.abs(expected - plain).max() > 0.1 * np.abs(plain).max(), "guidance changes the gradient"
    assert_close(out.guided_gradients, expected)
    assert_close(out.pixel_gradients, plain)
    alone = engine.run(batch, classes, pixels=True)
    assert alone.guided_gradients.shape == (2, 2, 0, 0, 0), "a call that does not ask builds no guided backward"


def test_explain_guided_methods_read_the_guided_backward_of_the_same_call(small: tuple) -> None:
    """explain --method guided-backprop,guided-gradcam: the maps of the call's guided gradients (its ReLUs guided,
    so not saliency's), guided-gradcam that times the call's Grad-CAM map upsampled to the input."""
    from onnxcam import maps
    from onnxcam.api import Explainer

    _, path = small
    photo = random_images(1, seed=8, size=SIZE[0])[0]
    found = {m.method: m for m in Explainer(path).explain(
        photo, method=["guided-backprop", "guided-gradcam", "gradcam", "saliency"], targets=[2]).maps}  # fmt: skip
    out = Engine(path).run(photo[None], np.array([[2]]), pixels=True, guided=True)
    guided = np.abs(out.guided_gradients[0]).max(axis=1)
    expected, _ = maps.finish(guided[0], SIZE, percentile=99)
    np.testing.assert_allclose(found["guided-backprop"].cam, expected, atol=1e-4)
    layer = found["gradcam"].cam_lowres
    expected, _ = maps.finish(guided[0] * maps.upsample(layer, SIZE), SIZE, percentile=99)
    np.testing.assert_allclose(found["guided-gradcam"].cam, expected, atol=1e-4)
    assert np.abs(found["saliency"].cam - found["guided-backprop"].cam).max() > 0.1


def test_explain_integrated_gradients_flags_reach_the_attribution_and_completeness(small: tuple,
                                                                                   tmp_path: Path) -> None:  # fmt: skip
    """--steps, --rule and --baseline blur: the JSON's completeness and the attribution .npy (the channel sum,
    signed) are those of pixels.integrated_gradients with the same settings on the same photo."""
    import json

    from onnxcam import pixels
    from onnxcam.image import read_rgb
    from onnxcam.outputs import write_picture_rgb as write_png
    from tests.test_cli import run

    _, path = small
    photo = random_images(1, seed=12, size=SIZE[0])[0]
    write_png(tmp_path / "p.png", photo)
    shown = run("explain", str(tmp_path / "p.png"), "--model", str(path), "--method", "integrated-gradients",
                "--target", "2", "--steps", "8", "--rule", "riemann_trapezoid", "--baseline", "blur",
                "--out", str(tmp_path / "out"), "--json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    (target,) = json.loads(shown.stdout)["images"][0]["targets"]
    settings = pixels.Settings(steps=8, rule="riemann_trapezoid", baseline="blur")
    image = read_rgb(tmp_path / "p.png")
    expected = pixels.integrated_gradients(Engine(path), image, np.array([2]), settings.baseline_of(image), 8,
                                           "riemann_trapezoid")  # fmt: skip
    assert target["completeness"] == pytest.approx(float(expected.completeness[0]), abs=1e-6)
    raw = expected.values[0].sum(axis=0)
    np.testing.assert_allclose(np.load(target["attribution"]), raw, atol=1e-5 * np.abs(raw).max())
    black = run("explain", str(tmp_path / "p.png"), "--model", str(path), "--method", "integrated-gradients",
                "--target", "2", "--steps", "8", "--out", str(tmp_path / "black"), "--json")  # fmt: skip
    (other,) = json.loads(black.stdout)["images"][0]["targets"]
    assert other["completeness"] != target["completeness"], "the baseline is the flag's"
    table = run("explain", str(tmp_path / "p.png"), "--model", str(path), "--method", "integrated-gradients",
                "--target", "2", "--steps", "8", "--out", str(tmp_path / "table"))  # fmt: skip
    shown = pixels.completeness_text(other["completeness"])
    assert f"(completeness error {shown})" in table.stdout
    assert f"completeness error {shown}" in (tmp_path / "table" / "index.html").read_text()
    few = run("explain", str(tmp_path / "p.png"), "--model", str(path), "--method", "integrated-gradients",
              "--target", "2", "--steps", "1", "--out", str(tmp_path / "few"), "--json")  # fmt: skip
    error = json.loads(few.stdout)["images"][0]["targets"][0]["completeness"]
    assert error > pixels.COMPLETE > other["completeness"], "one step misses the integral, eight do not (the cases)"
    assert shown == f"{other['completeness']:.2%}"
    assert pixels.completeness_text(error) == f"{error:.2%}, above 5%: raise --steps"
    few = run("explain", str(tmp_path / "p.png"), "--model", str(path), "--method", "integrated-gradients",
              "--target", "2", "--steps", "1", "--out", str(tmp_path / "few table"))  # fmt: skip
    assert f"(completeness error {error:.2%}, above 5%: raise --steps)" in few.stdout
    signed = read_rgb(target["signed"]).astype(int)  # both signs: red where raw > 0, blue where raw < 0
    top = np.percentile(np.abs(raw), 99)
    for sign, (more, less) in ((1, (0, 2)), (-1, (2, 0))):
        strong = sign * raw > 0.5 * top
        assert strong.any() and (signed[strong][:, more] > signed[strong][:, less]).all(), sign


@pytest.mark.parametrize(("flags", "message"), [
    (["--steps", "1", "--rule", "riemann_left"], "--steps must be at least 2 for riemann_left"),
    (["--rule", "simpson"], "rule must be one of gausslegendre"),
    (["--baseline", "missing.png"], "missing.png"),
    (["--noise", "-1"], "--noise in [0, 10)"),
    (["--percentile", "0"], "--percentile must be in (0, 100]"),
    (["--chunk", "0"], "--chunk must be at least 1"),
    (["--method", "integrated-gradients", "--samples", "8"],
     "--samples applies to smoothgrad, smoothgrad-squared; the methods asked (integrated-gradients) do not read it"),
])  # fmt: skip
def test_bad_attribution_flags_fail_in_one_line(small: tuple, tmp_path: Path, flags: list[str], message: str) -> None:
    """Each flag checked before any image is read; one that none of the methods asked reads is refused, not
    ignored."""
    from onnxcam.outputs import write_picture_rgb as write_png
    from tests.test_cli import assert_clean_failure, run

    _, path = small
    write_png(tmp_path / "p.png", random_images(1, size=SIZE[0])[0])
    method = [] if "--method" in flags else ["--method", "integrated-gradients,smoothgrad"]
    result = run("explain", str(tmp_path / "p.png"), "--model", str(path), *method, *flags,
                 "--out", str(tmp_path / "out"))  # fmt: skip
    assert_clean_failure(result, message)
    assert not (tmp_path / "out").exists()


def test_eval_and_audit_measure_a_pixel_methods_own_map(small: tuple, tmp_path: Path) -> None:
    """eval --method saliency: the deletion AUC of the unclipped saliency map (from autograd's gradients) of the
    top class; audit --method saliency: its mass inside the object's box."""
    import json

    from onnxcam import maps, metrics
    from onnxcam.api import Explainer
    from onnxcam.evaluate import scorer
    from onnxcam.outputs import write_picture_rgb
    from tests.test_cli import run

    model, path = small
    photo = random_images(1, seed=13, size=SIZE[0])[0]
    explainer = Explainer(path)
    top = explainer.explain(photo, top_k=1).maps[0].index
    _, g = input_gradients(model, photo[None], np.array([[top]]))
    cam, _ = maps.finish(np.abs(g[0, 0]).max(axis=0), SIZE)
    label = explainer.labels[top]
    (tmp_path / "data" / label).mkdir(parents=True)
    write_picture_rgb(tmp_path / "data" / label / "p.png", photo)
    evaluated = run("eval", str(tmp_path / "data" / label / "p.png"), "--model", str(path), "--method", "saliency",
                    "--json")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    (row,) = json.loads(evaluated.stdout)["images"]
    assert row["deletion_auc"] == pytest.approx(metrics.deletion(scorer(explainer, top), photo, cam)[0], abs=1e-3)
    box = [0, 0, 15, 31]
    (tmp_path / "boxes.json").write_text(json.dumps({str((tmp_path / "data" / label / "p.png").resolve()): box}))
    audited = run("audit", str(tmp_path / "data"), "--boxes", str(tmp_path / "boxes.json"), "--model", str(path),
                  "--method", "saliency", "--out", str(tmp_path / "audit"), "--json")  # fmt: skip
    assert audited.returncode == 0, audited.stderr
    (record,) = [r for r in (json.loads(x) for x in (tmp_path / "audit" / "audit.jsonl").read_text().splitlines())]
    assert record["target"]["method"] == "saliency"
    assert record["object_share"] == pytest.approx(maps.box_share(cam, tuple(box)), abs=1e-4)


@pytest.mark.slow
def test_guided_backprop_ignores_a_reinitialised_classifier(lite0_pixels: Path, tmp_path: Path) -> None:
    """Adebayo et al.'s sanity check, its first step, on Lite0's cat: with the classifier re-initialised, Guided
    Backpropagation's map hardly changes (Spearman >= 0.95; measured 1.00) while saliency's and Grad-CAM's do
    (<= 0.8; measured 0.37 and 0.74). The whole cascade: benchmarks/sanity.py, in the README."""
    from onnxcam.api import Explainer
    from onnxcam.image import read_rgb
    from onnxcam_export.torch_export import export_module
    from tests.conftest import EXAMPLES

    def spearman(a: np.ndarray, b: np.ndarray) -> float:
        ranks = [np.argsort(np.argsort(v.ravel(), kind="stable"), kind="stable") for v in (a, b)]
        return float(np.corrcoef(*ranks)[0, 1])

    model = lite0_torch()
    torch.manual_seed(0)
    model._fc.reset_parameters()
    export_module(model, "efficientnet_lite0", "classifier re-initialised", None, tmp_path / "random.onnx",
                  pixels=True)  # fmt: skip
    photo = read_rgb(EXAMPLES / "chelsea.png")
    names = ["guided-backprop", "saliency", "gradcam"]
    trained, reset = ({m.method: m.cam for m in Explainer(p).explain(photo, targets=[285], method=names,
                                                                     percentile=100).maps}
                      for p in (lite0_pixels, tmp_path / "random.onnx"))  # fmt: skip
    found = {name: spearman(trained[name], reset[name]) for name in names}
    assert found["guided-backprop"] >= 0.95 and found["saliency"] <= 0.8 and found["gradcam"] <= 0.8, found
