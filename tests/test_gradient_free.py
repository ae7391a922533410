"""A classifier whose backward cannot be built (an op without a rule, control flow) still gets a map: a
gradient-free file carrying ReciproCAM in its graph. Checked against ReciproCAM computed with loops over the
locations in torch on the same weights, the in-graph map against the Python path, and what explain says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam.engine import Engine
from onnxcam_export.from_onnx import Preprocessing, graft_file
from tests.test_cli import assert_clean_failure, run
from tests.test_transformers import export_plain

torch = pytest.importorskip("torch")
nn = torch.nn
UNIT = Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False)  # the model takes pixel / 255
SIZE = (32, 32)
LAYER = "/features/features.3/Relu_output_0"  # [N, 16, 8, 8], before the LSTM


class LstmHead(nn.Module):
    """Convolutions to an 8x8 grid, then an LSTM over its 64 cells and a linear classifier on the last step:
    ONNX's ``LSTM`` op has no gradient rule."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        steps, _ = self.lstm(features.flatten(2).transpose(1, 2))
        return self.fc(steps[:, -1])


@pytest.fixture(scope="module")
def gradient_free(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, list[str]]:
    torch.manual_seed(0)
    model = LstmHead().eval()
    folder = tmp_path_factory.mktemp("gradient-free")
    export_plain(model, SIZE, folder / "lstm.onnx", dynamo=False)
    _, notes = graft_file(folder / "lstm.onnx", folder / "lstm.cam.onnx", layer=LAYER, prep=UNIT)
    return model, folder / "lstm.cam.onnx", notes


def images(count: int = 2) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, *SIZE, 3), dtype=np.uint8)


def reciprocam_with_loops(model: LstmHead, image: np.ndarray, classes: list[int]) -> np.ndarray:
    """ReciproCAM (Byun & Lee, 2022) location by location in torch: the features kept at (i, j) alone through the
    head, class c's softmax probability there. ``[T, h, w]``."""
    x = torch.from_numpy(image[None] / 255.0).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        features = model.features(x)[0]
        _, height, width = features.shape
        cam = np.zeros((len(classes), height, width))
        for i in range(height):
            for j in range(width):
                alone = torch.zeros_like(features)
                alone[:, i, j] = features[:, i, j]
                probs = torch.softmax(model.head(alone[None]).double(), 1)[0]
                cam[:, i, j] = probs[classes].numpy()
    return cam


def test_an_op_without_a_rule_gives_a_gradient_free_file_that_says_why(gradient_free: tuple) -> None:
    """It was refused: `cannot build the gradient for layer ...: no gradient rule for op 'LSTM'`."""
    model, path, notes = gradient_free
    card = Engine(path).card
    assert card.weights_path == "none" and not card.has_gradients and card.saliency_methods == ("reciprocam",)
    assert any("no gradient rule for op 'LSTM'" in n and "gradient-free" in n for n in notes), notes
    out = Engine(path).run(images(), np.array([[-1, 3], [-1, 3]]))
    x = torch.from_numpy(images() / 255.0).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-6)
    assert out.weights.shape == (2, 2, 0) and out.gradients.shape == (2, 2, 0, 0, 0)
    np.testing.assert_array_equal(out.target_classes, [[expected[0].argmax(), 3], [expected[1].argmax(), 3]])


def test_reciprocam_in_the_graph_and_in_python_equal_the_formula_with_loops(gradient_free: tuple) -> None:
    model, path, _ = gradient_free
    explainer = Explainer(path)
    engine = explainer.engine
    batch = images()
    out = engine.run(batch, np.array([[-1, 3], [-1, 3]]), saliency="reciprocam")
    for n, image in enumerate(batch):
        classes = [int(c) for c in out.target_classes[n]]
        expected = reciprocam_with_loops(model, image, classes)
        result = explainer.explain(image, targets=[classes[1]], top_k=1)  # the default method: ReciproCAM
        assert [m.method for m in result.maps] == ["reciprocam", "reciprocam"]
        for m in result.maps:
            t = classes.index(m.index)
            assert np.abs(m.cam_lowres - expected[t]).max() < 1e-5
            assert np.abs(m.cam - out.saliency[n, t]).max() < 1e-4, "the in-graph map is the Python one"
        assert np.abs(expected[0] - expected[0].mean()).max() > 1e-3, "a map that varies"


def test_explain_uses_it_without_flags_and_refuses_a_gradient_method(gradient_free: tuple, tmp_path: Path) -> None:
    import cv2

    _, path, _ = gradient_free
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), images(1)[0])
    result = run("explain", str(photo), "--model", str(path), "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [t["method"] for t in report["images"][0]["targets"]] == ["reciprocam"]
    assert any("carries no gradients" in w for w in report["warnings"]), report["warnings"]
    refused = run("explain", str(photo), "--model", str(path), "--out", str(tmp_path / "no"), "--method", "gradcam")
    assert_clean_failure(refused, "gradcam reads gradients, which this file does not carry", "reciprocam")
    assert not (tmp_path / "no").exists() or not any((tmp_path / "no").glob("*.png"))
    free = run("explain", str(photo), "--model", str(path), "--out", str(tmp_path / "all"), "--method", "all", "--json")
    assert free.returncode == 0, free.stderr
    methods = {t["method"] for t in json.loads(free.stdout)["images"][0]["targets"]}
    assert methods == {"eigencam", "scorecam", "ablationcam", "reciprocam"}


def test_a_detector_without_a_backward_is_still_refused_naming_the_op(tmp_path: Path) -> None:
    """ReciproCAM's file is a classifier's: other tasks keep the refusal."""

    class LstmSegmenter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
            self.lstm = nn.LSTM(8, 3, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.features(x)
            steps, _ = self.lstm(f.flatten(2).transpose(1, 2))  # [N, 256, 3]
            return steps.transpose(1, 2).reshape(-1, 3, 16, 16)

    export_plain(LstmSegmenter().eval(), SIZE, tmp_path / "seg.onnx", dynamo=False)
    result = run("export", "--from", str(tmp_path / "seg.onnx"), "--mean", "0", "0", "0", "--std", "1", "1", "1",
                 "--task", "segmentation", "--layer", "/features/features.1/Relu_output_0")  # fmt: skip
    assert_clean_failure(result, "no gradient rule for op 'LSTM'")
    assert not (tmp_path / "seg.cam.onnx").exists()


def test_a_recurrent_head_never_runs_on_an_empty_image_batch(tmp_path: Path) -> None:
    """Head-only passes feed an empty image batch so that the backbone costs nothing; ONNX Runtime 1.32 aborts the
    process (no exception) when an LSTM runs on an empty batch: `explain` died with SIGABRT."""
    import cv2

    from tests.small_graphs import LAYER as CELLS
    from tests.small_graphs import classifier

    source = classifier(tmp_path / "lstm.onnx", lstm=True)
    graft_file(source, tmp_path / "lstm.cam.onnx", layer=CELLS, prep=UNIT)
    assert not Engine(tmp_path / "lstm.cam.onnx").card.empty_batch
    cv2.imwrite(str(tmp_path / "photo.png"), images(1)[0])
    result = run("explain", str(tmp_path / "photo.png"), "--model", str(tmp_path / "lstm.cam.onnx"), "--out",
                 str(tmp_path / "out"), "--json")  # fmt: skip
    assert result.returncode == 0, (result.returncode, result.stderr[-500:])
    assert json.loads(result.stdout)["images"][0]["targets"][0]["method"] == "reciprocam"
