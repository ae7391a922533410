"""``onnxcam export --from``: grafting ONNX classifiers nobody here wrote, checked without torch.

The model-zoo layouts come with the onnx package (``onnx/backend/test/data/light``): the
real graphs of VGG19, ResNet50, SqueezeNet, AlexNet, DenseNet121, Inception v1/v2,
ShuffleNet and ZFNet512, whose weights are stored as constants (ConstantOfShape). The tests
give them seeded random weights so that every channel differs, graft them, and compare the
grafted gradient with a central finite difference of the head in ONNX Runtime.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxcam.engine import Engine
from onnxcam_export.from_onnx import Preprocessing, _model_input, graft_file
from onnxcam_export.graft import head_model
from tests.test_saliency import assert_saliency_matches_python

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = {p.stem.removeprefix("light_"): p for p in sorted(LIGHT.glob("light_*.onnx"))}
# The layer the grafter picks by itself, checked by hand against each network's published layout.
AUTO_LAYER_SHAPES = {
    "bvlc_alexnet": (256, 12, 12),  # relu5, before pool5 (ONNX pools round down where Caffe rounded up)
    "densenet121": (1024, 7, 7),  # the last dense block's BN + ReLU
    "inception_v1": (1024, 6, 6),  # the last inception module's concat (Caffe2's 224 input gives 6x6)
    "inception_v2": (1024, 7, 7),  # the last inception module's concat
    "resnet50": (2048, 7, 7),  # res5c: the last residual Sum + ReLU
    "shufflenet": (544, 7, 7),  # the last unit's Sum + ReLU
    "squeezenet": (1000, 13, 13),  # conv10 + ReLU, the 1x1-conv classifier before its global pool
    "vgg19": (512, 14, 14),  # conv5_4 + ReLU, before pool5 (as in the Grad-CAM paper)
    "zfnet512": (512, 12, 12),  # conv5 + ReLU, before pool5
}


def randomized(path: Path, seed: int = 0) -> onnx.ModelProto:
    """The model with each constant weight replaced by seeded random values of a sensible scale."""
    model = onnx.load(path)
    rng = np.random.default_rng(seed)
    shapes = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers = {name: (n.op_type, list(n.input).index(name)) for n in model.graph.node for name in n.input}
    for node in list(model.graph.node):
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            continue
        shape = [int(d) for d in shapes[node.input[0]]]
        op, index = consumers.get(node.output[0], ("", 0))
        if op == "BatchNormalization":
            value = rng.uniform(0.5, 1.5, shape) if index in (1, 4) else rng.normal(0, 0.1, shape)
        elif op == "Mul":
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) >= 2:
            value = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
        else:
            value = rng.normal(0, 0.1, shape)
        model.graph.node.remove(node)
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
    return model


def as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float64 (weights and declared types converted)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for info in [*out.graph.input, *out.graph.output]:
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            info.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    del out.graph.value_info[:]
    return out


FLOAT32_ONLY = {"Conv", "MaxPool", "AveragePool", "LRN"}  # ONNX Runtime has no double kernels for these


def head_in_float64(cam_model: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The head (target layer -> logits) computing in float64: ONNX Runtime where it has double kernels
    for every op, else onnx's own numpy reference implementation (ORT's Conv and pooling are float32 only).

    In float64 a tiny step keeps the finite difference off ReLU and max-pool kinks, and the
    comparison can be tight.
    """
    head = as_float64(head_model(onnx.load(cam_model)))
    if FLOAT32_ONLY.intersection(n.op_type for n in head.graph.node):  # (a session would only refuse them)
        reference = ReferenceEvaluator(head)
        return lambda a: reference.run(["logits"], {"activations": a})[0]
    try:
        session = ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"])
        return lambda a: session.run(["logits"], {"activations": a})[0]
    except ort.capi.onnxruntime_pybind11_state.NotImplemented:
        reference = ReferenceEvaluator(head)
        return lambda a: reference.run(["logits"], {"activations": a})[0]


def finite_difference_check(cam_model: Path, seed: int = 0, directions: int = 3, tolerance: float = 1e-4) -> None:
    """<gradients, v> against (f(A + eps v) - f(A - eps v)) / 2 eps, with f = the head in float64, for T = 2 targets.

    v is zero where A is exactly zero (ReLU's dead units): a max-pool window of tied zeros
    has no derivative, and a finite difference there measures none of its subgradients.
    """
    engine = Engine(cam_model)
    head = head_in_float64(cam_model)
    rng = np.random.default_rng(seed)
    height, width = engine.card.input_size
    image = rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8)
    out = engine.run(image, np.array([[-1, 7]]), full_gradients=True)
    a = out.activations.astype(np.float64)
    # the graph computes in float32: its logits carry float32 rounding of the largest ones
    np.testing.assert_allclose(head(a), out.logits, rtol=1e-4, atol=1e-4 + 1e-6 * np.abs(out.logits).max())
    for _ in range(directions):
        v = rng.standard_normal(a.shape) * (a != 0)
        eps = 1e-6 * np.sqrt((a**2).mean()) / np.sqrt((v**2).mean())
        plus, minus = head(a + eps * v), head(a - eps * v)
        for t, cls in enumerate(out.target_classes[0]):
            numeric = (float(plus[0, cls]) - float(minus[0, cls])) / (2 * eps)
            analytic = float((out.gradients[0, t].astype(np.float64) * v[0]).sum())
            scale = max(abs(analytic), np.abs(out.gradients[0, t]).sum() * np.abs(v).mean() * 1e-2)
            assert abs(numeric - analytic) <= tolerance * scale, f"target {cls}: FD {numeric} vs <G, v> {analytic}"


# not in the fast subset: 4096-wide FC stacks in numpy (tens of seconds each), or several seconds each
SLOW_ZOO = {"vgg19", "zfnet512", "bvlc_alexnet", "densenet121", "resnet50", "inception_v2"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_ZOO else []) for n in LIGHT_MODELS]
)
def test_model_zoo_layouts_graft_and_match_finite_differences(name: str, tmp_path: Path) -> None:
    source = tmp_path / f"{name}.onnx"
    onnx.save(randomized(LIGHT_MODELS[name]), source)
    card, notes = graft_file(source, tmp_path / f"{name}.cam.onnx")
    assert tuple(int(d) for d in card["layer"].split("(")[1].rstrip(")").split("x")) == AUTO_LAYER_SHAPES[name]
    assert any("target layer (auto)" in n for n in notes)
    finite_difference_check(tmp_path / f"{name}.cam.onnx")
    assert_saliency_matches_python(tmp_path / f"{name}.cam.onnx")


def test_softmax_is_stripped_and_the_opset_raised_only_as_needed(tmp_path: Path) -> None:
    _, notes = graft_file(LIGHT_MODELS["vgg19"], tmp_path / "vgg19.cam.onnx")
    assert any("ends in Softmax" in n for n in notes)
    assert any("opset 9 -> 16" in n for n in notes), "MaxPool's rule needs ScatterElements(add), opset 16"
    _, notes = graft_file(LIGHT_MODELS["resnet50"], tmp_path / "resnet50.cam.onnx")
    assert any("opset 9 -> 11" in n for n in notes), "no MaxPool in ResNet's head: opset 11 is enough"
    grafted = onnx.load(tmp_path / "resnet50.cam.onnx")
    assert grafted.opset_import[0].version == 11


def test_preprocessing_in_the_graph_matches_numpy(tmp_path: Path) -> None:
    """BGR flip, mean and std applied in the graph equal the same formula in numpy."""
    model = onnx.load(LIGHT_MODELS["squeezenet"])
    prep = Preprocessing.create(None, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), bgr=True)
    graft_file(LIGHT_MODELS["squeezenet"], tmp_path / "sq.cam.onnx", prep=prep)
    image = np.random.default_rng(1).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    expected = ((image[..., ::-1] / 255 - [0.6, 0.5, 0.4]) / [0.3, 0.25, 0.2]).transpose(0, 3, 1, 2)
    grafted = onnx.load(tmp_path / "sq.cam.onnx")
    data = _model_input(model.graph).name
    grafted.graph.output.append(onnx.helper.make_tensor_value_info(data, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(grafted.SerializeToString(), providers=["CPUExecutionProvider"])
    fed = session.run([data], {"image": image, "targets": np.array([[0]]), "return_saliency": np.asarray(False),
                               "saliency_method": np.asarray(0)})[0]  # fmt: skip
    np.testing.assert_allclose(fed, expected, rtol=1e-5, atol=1e-5)


def plain_torch_export(arch_name: str, weights: str, path: Path, opset: int) -> None:
    """What a user has: the classifier exported by torch.onnx, float NCHW input, normalised outside."""
    torch = pytest.importorskip("torch")
    from onnxcam_export.torch_export import ARCHS, RANDOM_SEED, load_weights

    arch = ARCHS[arch_name]
    torch.manual_seed(RANDOM_SEED)
    model = arch.build().eval()
    load_weights(arch, model, weights)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about SAME padding computed from shapes
        names = {"input_names": ["input"], "output_names": ["scores"], "dynamic_axes": {"input": {0: "batch"}}}
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), path, dynamo=False, opset_version=opset, **names)


@pytest.mark.parametrize(
    ("arch_name", "weights", "fixture", "opset"),
    [("vgg16", "none", "vgg16_model", 13), ("efficientnet_lite0", "imagenet", "lite0_model", 11)],
)
def test_regrafting_our_torch_export_gives_the_native_maps(
    arch_name: str, weights: str, fixture: str, opset: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from onnxcam import Explainer
    from onnxcam_export.torch_export import ARCHS
    from tests.conftest import EXAMPLES

    plain = tmp_path / f"{arch_name}.onnx"
    plain_torch_export(arch_name, weights, plain, opset)
    arch = ARCHS[arch_name]
    graft_file(plain, tmp_path / "regrafted.onnx", prep=Preprocessing.create(None, arch.mean, arch.std, False))
    native = Explainer(request.getfixturevalue(fixture)).explain(EXAMPLES / "chelsea.png", top_k=3)
    regrafted = Explainer(tmp_path / "regrafted.onnx").explain(EXAMPLES / "chelsea.png", top_k=3)
    assert [m.index for m in regrafted.maps] == [m.index for m in native.maps]
    for ours, reference in zip(regrafted.maps, native.maps, strict=True):
        np.testing.assert_allclose(
            ours.weights, reference.weights, rtol=1e-4, atol=1e-5 * np.abs(reference.weights).max()
        )
        np.testing.assert_allclose(ours.cam, reference.cam, atol=1e-4)


def test_export_from_runs_where_torch_cannot_be_imported(tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    from tests.conftest import EXAMPLES, ROOT

    out = tmp_path / "squeezenet.cam.onnx"
    script = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError(f"{{name}} is blocked in this test")

        sys.meta_path.insert(0, Block())
        from onnxcam.cli import main
        sys.argv = ["onnxcam", "export", "--from", {str(LIGHT_MODELS["squeezenet"])!r}, "--out", {str(out)!r}]
        try:
            main()
        except SystemExit as exit:
            assert not exit.code, exit.code
        assert not any(m.split(".")[0] == "torch" for m in sys.modules), "torch got imported"
        sys.argv = ["onnxcam", "explain", {str(EXAMPLES / "chelsea.png")!r}, "--model", {str(out)!r},
                    "--out", {str(tmp_path / "maps")!r}]
        main()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "target layer (auto)" in result.stdout and "wrote" in result.stdout
    assert len(list((tmp_path / "maps").glob("chelsea_*.png"))) == 1
