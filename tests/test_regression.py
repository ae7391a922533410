"""Regressors (``[N, D]`` values: a quality score, landmark coordinates) grafted with ``--task regression``: each
output coordinate's gradient against torch autograd (float64 reference, float32 graph), and what ``explain``
writes for one (every output's value, each map's sign convention)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam.engine import Engine
from onnxcam_export.from_onnx import Preprocessing, graft_file
from tests.conftest import assert_rows_match_autograd
from tests.test_cli import assert_clean_failure, run
from tests.test_transformers import export_plain

torch = pytest.importorskip("torch")
nn = torch.nn
UNIT = Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False)  # the model takes pixel / 255
SIZE = (32, 32)
TOL = 1e-4


class Regressor(nn.Module):
    """Convolutions to an 8x8 grid, a pool and a linear layer to ``outputs`` values (no squashing)."""

    def __init__(self, outputs: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(16, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def images(count: int = 2) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, *SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def regressor(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, dict]:
    torch.manual_seed(0)
    model = Regressor().eval()
    folder = tmp_path_factory.mktemp("regressor")
    export_plain(model, SIZE, folder / "reg.onnx", dynamo=False, output="values")
    (folder / "names.txt").write_text("age\nx\ny\n")
    card, _ = graft_file(folder / "reg.onnx", folder / "reg.cam.onnx", labels=folder / "names.txt", prep=UNIT,
                         task="regression")  # fmt: skip
    return model, folder / "reg.cam.onnx", card


def test_each_outputs_gradient_equals_autograd(regressor: tuple) -> None:
    model, path, card = regressor
    assert card["task"] == "regression" and Engine(path).card.score == "value"
    out = Engine(path).run(images(), np.array([[0, 1, 2], [2, 0, 1]]), full_gradients=True)
    x = torch.from_numpy(images() / 255.0).permute(0, 3, 1, 2)
    reference = Regressor().double()
    reference.load_state_dict(model.state_dict())
    features = reference.features(x).detach().requires_grad_(True)
    values = reference.fc(features.mean((2, 3)))
    np.testing.assert_allclose(out.logits, values.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert_rows_match_autograd(out, values, features, TOL)


def test_explain_writes_every_outputs_value_and_the_sign_of_its_maps(regressor: tuple, tmp_path: Path) -> None:
    import cv2

    model, path, _ = regressor
    cv2.imwrite(str(tmp_path / "photo.png"), images(1)[0][:, :, ::-1])
    result = run("explain", str(tmp_path / "photo.png"), "--model", str(path), "--out", str(tmp_path / "out"),
                 "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    item = json.loads(result.stdout)["images"][0]
    with torch.no_grad():
        expected = model(torch.from_numpy(images(1) / 255.0).permute(0, 3, 1, 2).float())[0].numpy()
    assert [p["label"] for p in item["predictions"]] == ["age", "x", "y"]
    np.testing.assert_allclose([p["probability"] for p in item["predictions"]], expected, rtol=1e-5, atol=1e-6)
    assert [t["label"] for t in item["targets"]] == ["age", "x", "y"]
    assert all("raises this output's value" in t["explains"] for t in item["targets"])
    one = Explainer(path).explain(images(1)[0], targets=["y"]).maps
    assert [m.label for m in one] == ["y"]
    ranked = run("explain", str(tmp_path / "photo.png"), "--model", str(path), "--out", str(tmp_path / "no"),
                 "--top-k", "2")  # fmt: skip
    assert_clean_failure(ranked, "no ranking", "--target")


def test_one_value_per_image_is_refused_unless_told_and_explained_when_told(tmp_path: Path) -> None:
    """A ``[N, 1]`` output was refused with no way forward; told, it is a regressor of one value."""
    torch.manual_seed(0)
    export_plain(Regressor(outputs=1).eval(), SIZE, tmp_path / "one.onnx", dynamo=False, output="quality")
    refused = run("export", "--from", str(tmp_path / "one.onnx"), "--mean", "0", "0", "0", "--std", "1", "1", "1")
    assert_clean_failure(refused, "one score per image", "--task regression")
    told = run("export", "--from", str(tmp_path / "one.onnx"), "--mean", "0", "0", "0", "--std", "1", "1", "1",
               "--task", "regression")  # fmt: skip
    assert told.returncode == 0, told.stderr
    assert Explainer(tmp_path / "one.cam.onnx").labels == ("output 0",)


def test_smoothgrad_of_an_output_is_its_mean_gradient_over_the_noisy_inputs(tmp_path: Path) -> None:
    """--method smoothgrad on a regressor exported with --pixels: each output's mean gradient over SmoothGrad's
    noisy inputs (pixels.noise_samples: the same draws), by autograd."""
    from onnxcam import pixels
    from tests.test_pixels import assert_close

    torch.manual_seed(0)
    model = Regressor().eval()
    export_plain(model, SIZE, tmp_path / "reg.onnx", dynamo=False, output="values")
    graft_file(tmp_path / "reg.onnx", tmp_path / "reg.cam.onnx", prep=UNIT, task="regression", pixels=True)
    photo = images(1)[0]
    explainer = Explainer(tmp_path / "reg.cam.onnx")
    found = explainer.explain(photo, targets=[0, 2], method="smoothgrad", attribution=pixels.Settings(samples=4))
    noisy = torch.from_numpy(pixels.noise_samples(explainer.engine, photo, samples=4)).double().requires_grad_(True)
    reference = Regressor().double()
    reference.load_state_dict(model.state_dict())
    values = reference(noisy)
    for m, output in zip(found.maps, (0, 2), strict=True):
        mean = torch.autograd.grad(values[:, output].sum(), noisy, retain_graph=True)[0].numpy().mean(0)
        assert_close(m.attribution[None, None], np.abs(mean).max(0)[None, None])
