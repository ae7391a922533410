"""The grafted gradients against torch autograd (float64), and the multi-target contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxcam.engine import Engine
from tests.conftest import random_images, torch_reference

pytest.importorskip("torch")
TOL = 1e-4  # relative to the largest magnitude, float32 graph vs float64 autograd


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _window_masks(activations: np.ndarray, pool: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Masks [N, C, h, w] over 2x2 max-pool windows: (clear winner, all zero).

    A window whose two largest values lie within float32 noise, or tie exactly as all-zero
    ReLU windows do, has two valid subgradients: the raw gradient is compared only where
    the winner is clear. A (.) G is also unambiguous in all-zero windows (A = 0 there).
    """
    n, c, h, w = activations.shape
    windows = activations.reshape(n, c, h // pool, pool, w // pool, pool).transpose(0, 1, 2, 4, 3, 5)
    top2 = np.sort(windows.reshape(n, c, h // pool, w // pool, -1), axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 1e-4 * np.abs(activations).max()
    zero = top2[..., 1] == 0
    return tuple(np.repeat(np.repeat(m, pool, axis=2), pool, axis=3) for m in (clear, zero))


CASES = {
    "vgg16": ("vgg16", "none", "vgg16_model"),
    "efficientnet_lite0": ("efficientnet_lite0", "imagenet", "lite0_model"),
}


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_torch_autograd(name: str, request: pytest.FixtureRequest) -> None:
    arch, weights, fixture = CASES[name]
    engine = Engine(request.getfixturevalue(fixture))
    images = random_images(2, seed=7)
    targets = np.array([[3, -1, 281], [-2, 7, 999]], dtype=np.int64)
    out = engine.run(images, targets, full_gradients=True)
    logits, activations, gradients = torch_reference(arch, weights, images, out.target_classes)

    assert _rel(out.logits, logits) < TOL
    assert _rel(out.activations, activations) < TOL
    assert _rel(out.weights, gradients.mean(axis=(3, 4))) < TOL, "pooled weights alpha"
    assert _rel(out.gradients.mean(axis=(3, 4)), gradients.mean(axis=(3, 4))) < TOL
    a_g, a_g_ref = activations[:, None] * out.gradients, activations[:, None] * gradients
    if arch == "vgg16":
        clear, zero = (np.broadcast_to(m[:, None], a_g.shape) for m in _window_masks(activations))
        comparable = clear | zero
        assert comparable.mean() > 0.99 and clear.mean() > 0.5, "the comparison must cover the tensor"
        assert np.abs(a_g - a_g_ref)[comparable].max() / np.abs(a_g_ref).max() < TOL, "A (.) G"
        assert np.abs(out.gradients - gradients)[clear].max() / np.abs(gradients).max() < TOL, "G"
    else:
        assert _rel(a_g, a_g_ref) < TOL, "A (.) G"
        assert _rel(out.gradients, gradients) < TOL, "G"


@pytest.mark.parametrize("fixture", ["vgg16_model", "lite0_model"])
def test_targets_in_one_call_equal_separate_calls(fixture: str, request: pytest.FixtureRequest) -> None:
    engine = Engine(request.getfixturevalue(fixture))
    images = random_images(2, seed=3)
    classes = np.array([[5, 17, 400], [17, 5, 0]], dtype=np.int64)
    together = engine.run(images, classes, full_gradients=True)
    for t in range(classes.shape[1]):
        alone = engine.run(images, classes[:, [t]], full_gradients=True)
        np.testing.assert_allclose(together.weights[:, t], alone.weights[:, 0], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(together.gradients[:, t], alone.gradients[:, 0], rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(together.target_classes, classes)


@pytest.mark.parametrize("fixture", ["vgg16_model", "lite0_model"])
def test_negative_targets_explain_the_true_top_k(fixture: str, request: pytest.FixtureRequest) -> None:
    engine = Engine(request.getfixturevalue(fixture))
    images = random_images(3, seed=11)
    ranked = engine.run(images, np.tile(-np.arange(1, 6), (3, 1)))
    top5 = np.argsort(-ranked.logits, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ranked.target_classes, top5)
    explicit = engine.run(images, top5)
    np.testing.assert_allclose(ranked.weights, explicit.weights, rtol=1e-6, atol=1e-12)


def test_weights_do_not_need_full_gradients(lite0_model: Path) -> None:
    engine = Engine(lite0_model)
    images, targets = random_images(1, seed=5), np.array([[1, -1]])
    cheap, full = engine.run(images, targets), engine.run(images, targets, full_gradients=True)
    assert cheap.gradients.shape == (1, 2, 1280, 0, 0)
    assert full.gradients.shape == (1, 2, 1280, 7, 7)
    np.testing.assert_allclose(cheap.weights, full.gradients.mean(axis=(3, 4)), rtol=1e-5, atol=1e-9)


def _presummed_readers(model: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(model).graph.node if any("fc_weight_presummed" in i for i in n.input)]


def test_presummed_weights_of_the_logit_are_rows_of_the_target_classes(lite0_model: Path) -> None:
    """Lite0's head is pool + FC, so its weights come from the FC weight summed over space: for the logit, the rows
    of the target classes (a Gather, not a MatMul reading all 1000 rows; their values: the test above)."""
    assert _presummed_readers(lite0_model) == ["Gather"]


def test_presummed_weights_of_the_probability_match_torch_autograd(tmp_path: Path) -> None:
    """For the probability, the softmax's gradient times all the rows."""
    from onnxcam_export.torch_export import export_arch

    export_arch("efficientnet_lite0", "none", None, tmp_path / "lite0.onnx", score="probability")
    assert _presummed_readers(tmp_path / "lite0.onnx") == ["MatMul"]
    engine = Engine(tmp_path / "lite0.onnx")
    images, targets = random_images(2, seed=3), np.array([[-1, 5], [999, -3]])
    out = engine.run(images, targets)
    _, _, gradients = torch_reference("efficientnet_lite0", "none", images, out.target_classes, score="probability")
    assert _rel(out.weights, gradients.mean(axis=(3, 4))) < TOL


TORCHVISION_ARCHS = [
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "convnext_tiny",
]


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_architectures_match_torch_autograd(arch: str, tmp_path: Path) -> None:
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # absent, or broken beside this torch build
        pytest.skip(f"torchvision does not import here ({type(exc).__name__}); needs a matching torch")
    from onnxcam_export.torch_export import export_arch

    export_arch(arch, "none", None, tmp_path / f"{arch}.onnx")
    engine = Engine(tmp_path / f"{arch}.onnx")
    images = random_images(2, seed=1)
    out = engine.run(images, np.array([[-1, 3], [5, -2]]), full_gradients=True)
    logits, activations, gradients = torch_reference(arch, "none", images, out.target_classes)
    assert _rel(out.logits, logits) < TOL and _rel(out.activations, activations) < TOL
    assert _rel(out.weights, gradients.mean(axis=(3, 4))) < TOL
    assert _rel(out.gradients, gradients) < TOL
