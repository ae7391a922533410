"""ReciproCAM against OpenVINO XAI's (its white-box default for CNNs) on the same ONNX classifier and image.

OpenVINO XAI inserts the method into the OpenVINO model (``openvino_xai.Explainer`` with
``Method.RECIPROCAM``): the target layer's feature map repeated h * w times, each copy kept at one location, the
rest of the model run on all copies, each copy scored by the logits before the model's Softmax (where the paper's
authors' code and onnxcam take the softmax probability), min-max scaled to 0..255. Compared: the same mosaics
through the onnxcam file's head-only graph, scaled as OpenVINO XAI scales. Runs where ``openvino-xai`` imports (a
venv of its own: it pins ``openvino-dev`` 2024.4 and numpy 1); skipped elsewhere, with the reason. Slow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam_export.from_onnx import Preprocessing, graft_file
from tests.small_graphs import CLASSES, LAYER, SIZE, classifier

try:
    import openvino_xai as xai
    from openvino_xai.explainer import ExplainMode
except Exception as exc:  # ImportError, or an OpenVINO runtime that does not load here
    pytest.skip(f"openvino-xai does not import here ({type(exc).__name__}: {exc})"[:300], allow_module_level=True)

pytestmark = pytest.mark.slow


def theirs(source: Path, image: np.ndarray, classes: list[int], monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """OpenVINO XAI's ReciproCAM maps ``[T, h, w]`` (uint8, 0..255) of ``classes`` at the target layer, computed in
    float32 (OpenVINO's CPU plugin runs bfloat16 where the CPU has AVX-512 BF16, which moves the maps by ~1%)."""
    import openvino as ov

    compile_model = ov.Core.compile_model
    monkeypatch.setattr(ov.Core, "compile_model", lambda core, model, device_name="CPU", config=None: compile_model(
        core, model, device_name, {**(config or {}), "INFERENCE_PRECISION_HINT": "f32"}))  # fmt: skip
    explainer = xai.Explainer(model=str(source), task=xai.Task.CLASSIFICATION, explain_mode=ExplainMode.WHITEBOX,
                              explain_method=xai.Method.RECIPROCAM, target_layer=LAYER)  # fmt: skip
    x = (image.astype(np.float32) / 255).transpose(2, 0, 1)[None]
    explanation = explainer(x, targets=classes, resize=False, colormap=False)
    return np.stack([np.asarray(explanation.saliency_map[c], np.float64) for c in classes])


def scaled(cam: np.ndarray) -> np.ndarray:
    """Min-max to 0..255, as OpenVINO XAI scales its maps (before its rounding to uint8)."""
    return (cam - cam.min()) / (cam.max() - cam.min()) * 255


@pytest.mark.parametrize("kind", ["gradients", "gradient-free"])
def test_reciprocams_mosaics_through_the_files_head_equal_openvino_xais(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenVINO XAI scores each mosaic by the logits before the model's Softmax; the paper's authors' code (and
    onnxcam's ``reciprocam``) by the softmax probability. The mosaics through the file's head-only graph (what
    onnxcam's ReciproCAM runs, gradient file or gradient-free) give OpenVINO XAI's maps from their logits, and
    onnxcam's maps are the softmax of those same logits."""
    source = classifier(tmp_path / "cnn.onnx", lstm=kind == "gradient-free")
    graft_file(source, tmp_path / "cnn.cam.onnx", layer=LAYER, prep=Preprocessing.create(None, (0, 0, 0), (1, 1, 1),
                                                                                         False))  # fmt: skip
    explainer = Explainer(tmp_path / "cnn.cam.onnx")
    assert explainer.card.has_gradients == (kind == "gradients")
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    classes = list(range(CLASSES))
    out = explainer.engine.run(image[None], np.array([classes]))
    activations = out.activations[0]  # [C, h, w]
    channels, height, width = activations.shape
    mosaics = np.zeros((height * width, channels, height, width), np.float32)
    cells = np.arange(height * width)
    mosaics[cells, :, cells // width, cells % width] = activations[:, cells // width, cells % width].T
    logits = explainer.engine.run_head(mosaics).astype(np.float64)  # [h * w, K]
    expected = theirs(source, image, classes, monkeypatch)
    for c in classes:
        mine = scaled(logits[:, c].reshape(height, width))
        assert np.corrcoef(mine.ravel(), expected[c].ravel())[0, 1] > 0.9999
        assert np.abs(mine - expected[c]).max() <= 1.0, "equal but for the rounding to uint8"
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    ours = explainer.explain(image, targets=classes, top_k=0, method="reciprocam").maps
    for m in ours:
        np.testing.assert_allclose(m.cam_lowres, probs[:, m.index].reshape(height, width), rtol=1e-5, atol=1e-7)
