"""A PaddleOCR-style CTC text recogniser built in PaddlePaddle and exported by paddle2onnx (``paddle.onnx.export``),
grafted with the flags PaddleOCR's recognition preprocessing needs (48 rows, (x / 255 - 0.5) / 0.5).

Checks: the task is told from the per-step softmax, the graph's greedy decoding equals PaddleOCR's
``CTCLabelDecode`` on Paddle's own output for the same input, and two characters' gradients equal a float64
finite difference of the file's own head (:mod:`tests.graph_fd`). Runs where paddlepaddle and paddle2onnx import
(a venv of their own: no torch needed); skipped elsewhere, with the reason. Slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam_export.from_onnx import Preprocessing, graft_file
from tests.graph_fd import finite_difference

try:
    import paddle
    import paddle2onnx  # noqa: F401  (paddle.onnx.export calls it)
    from paddle import nn
except Exception as exc:  # ImportError, or a build without the CPU kernels
    pytest.skip(f"paddlepaddle/paddle2onnx do not import here ({type(exc).__name__}: {exc})"[:300],
                allow_module_level=True)  # fmt: skip

pytestmark = pytest.mark.slow
SIZE = (48, 320)  # PaddleOCR's rec_image_shape 3, 48, 320: 80 steps
CHARACTERS = "0123456789a"  # the dictionary, the blank left out (PaddleOCR's way)
PREP = Preprocessing.create(SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False)


class Recogniser(nn.Layer):
    """A PP-OCR recogniser in miniature: conv-BN-ReLU stages to a 3-row grid, the rows pooled away, an SVTR-style
    neck (one self-attention block over the steps, LayerNorm) and the CTC head's linear layer and softmax."""

    def __init__(self, symbols: int = len(CHARACTERS) + 1) -> None:
        super().__init__()
        stages, channels = [], 3
        for out, stride in ((16, 2), (32, (2, 1)), (32, (2, 2)), (48, (2, 1))):
            stages += [nn.Conv2D(channels, out, 3, stride, 1), nn.BatchNorm2D(out), nn.ReLU()]
            channels = out
        self.backbone = nn.Sequential(*stages)  # [N, 48, 3, 80]
        self.pool = nn.AdaptiveAvgPool2D((1, None))
        self.qkv, self.proj, self.norm = nn.Linear(48, 144), nn.Linear(48, 48), nn.LayerNorm(48)
        self.fc = nn.Linear(48, symbols)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        steps = self.pool(self.backbone(x)).squeeze(2).transpose([0, 2, 1])  # [N, 80, 48]
        q, k, v = paddle.split(self.qkv(steps), 3, axis=2)
        attention = nn.functional.softmax(paddle.matmul(q, k, transpose_y=True) / 48**0.5, axis=-1)
        steps = self.norm(steps + self.proj(paddle.matmul(attention, v)))
        return nn.functional.softmax(self.fc(steps) * 4, axis=2)


def ctc_label_decode(probs: np.ndarray, blank: int = 0) -> tuple[list[int], list[float]]:
    """PaddleOCR's ``CTCLabelDecode.decode`` on one ``[T, K]``: the kept symbols and their probabilities."""
    index, prob = probs.argmax(axis=1), probs.max(axis=1)
    selection = np.ones(len(index), dtype=bool)
    selection[1:] = index[1:] != index[:-1]
    selection &= index != blank
    return index[selection].tolist(), prob[selection].tolist()


def text_line(seed: int = 0) -> np.ndarray:
    """A 48x320 line of blocks of random grey levels, 8 to 40 columns wide (a random recogniser decodes a few
    characters from it)."""
    rng = np.random.default_rng(seed)
    line = rng.integers(0, 40, (*SIZE, 3))
    start = 0
    while start < SIZE[1]:
        width = int(rng.integers(8, 41))
        line[:, start : start + width] += int(rng.integers(0, 215))
        start += width
    return line.astype(np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Layer, Path, dict]:
    paddle.seed(0)
    model = Recogniser()
    model.eval()
    folder = tmp_path_factory.mktemp("paddle")
    spec = [paddle.static.InputSpec([None, 3, *SIZE], "float32", "x")]
    paddle.onnx.export(model, str(folder / "rec"), input_spec=spec, opset_version=13)
    (folder / "keys.txt").write_text("".join(f"{c}\n" for c in CHARACTERS))
    card, _ = graft_file(folder / "rec.onnx", folder / "rec.cam.onnx", labels=folder / "keys.txt", prep=PREP)
    return model, folder / "rec.cam.onnx", card


def test_the_graph_decodes_what_paddle_outputs_as_ctc_label_decode_does(exported: tuple) -> None:
    model, path, card = exported
    assert card["task"] == "recognition"
    explainer = Explainer(path)
    for seed in range(3):
        line = text_line(seed)
        result = explainer.explain(line)
        x = paddle.to_tensor(((line / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32))
        symbols, probabilities = ctc_label_decode(model(x).numpy()[0])
        assert len(symbols) >= 2, "the random recogniser should read a few characters"
        assert result.text == "".join(CHARACTERS[s - 1] for s in symbols)
        np.testing.assert_allclose([p.probability for p in result.predictions], probabilities, rtol=1e-4)
        assert [m.position for m in result.maps] == list(range(len(symbols)))


def test_two_characters_gradients_match_a_finite_difference_of_the_head(exported: tuple) -> None:
    _, path, card = exported
    explainer = Explainer(path)
    image = explainer.prepare(text_line(0)).model_input
    finite_difference(path, card, image, np.array([[0, 1]]))


def test_explain_writes_the_text(exported: tuple, tmp_path: Path) -> None:
    import subprocess
    import sys

    import cv2

    _, path, _ = exported
    cv2.imwrite(str(tmp_path / "line.png"), text_line(1)[:, :, ::-1])
    result = subprocess.run([sys.executable, "-m", "onnxcam", "explain", str(tmp_path / "line.png"), "--model",
                             str(path), "--out", str(tmp_path / "out"), "--json"], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    item = json.loads(result.stdout)["images"][0]
    assert item["text"] == Explainer(path).explain(text_line(1)).text and len(item["targets"]) == len(item["text"])


class TextDetector(nn.Layer):
    """A DB text detector in miniature (PaddleOCR's det models): conv-BN-ReLU stages to stride 8, upsampled back by
    two transposed convolutions, one sigmoid probability map ``[N, 1, H, W]``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2D(3, 16, 3, 2, 1), nn.BatchNorm2D(16), nn.ReLU(),
                                      nn.Conv2D(16, 32, 3, 2, 1), nn.BatchNorm2D(32), nn.ReLU(),
                                      nn.Conv2D(32, 32, 3, 2, 1), nn.BatchNorm2D(32), nn.ReLU())  # fmt: skip
        self.head = nn.Sequential(nn.Conv2DTranspose(32, 16, 2, 2), nn.BatchNorm2D(16), nn.ReLU(),
                                  nn.Conv2DTranspose(16, 1, 4, 4))  # fmt: skip

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return nn.functional.sigmoid(self.head(self.backbone(x)))


class DirectionClassifier(nn.Layer):
    """PaddleOCR's text-direction classifier in miniature (0 or 180 degrees): conv-BN-ReLU stages, a pool, a
    linear layer and a softmax over the 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2D(3, 16, 3, 2, 1), nn.BatchNorm2D(16), nn.ReLU(),
                                      nn.Conv2D(16, 32, 3, 2, 1), nn.BatchNorm2D(32), nn.ReLU())  # fmt: skip
        self.pool, self.fc = nn.AdaptiveAvgPool2D(1), nn.Linear(32, 2)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return nn.functional.softmax(self.fc(self.pool(self.backbone(x)).flatten(1)) * 8, axis=1)


@pytest.mark.parametrize("kind", ["detector", "classifier"])
def test_paddleocrs_detector_and_direction_classifier_graft_with_their_gradients(kind: str, tmp_path: Path) -> None:
    """The other two PP-OCR stages: the DB detector's one-channel map is a one-class segmenter (its logits before
    the Sigmoid, the pixels above 0), the direction classifier a classifier; each gradient matches its head."""
    paddle.seed(0)
    model, size, task = {"detector": (TextDetector(), (64, 64), "segmentation"),
                         "classifier": (DirectionClassifier(), (48, 192), "classification")}[kind]  # fmt: skip
    model.eval()
    spec = [paddle.static.InputSpec([None, 3, *size], "float32", "x")]
    paddle.onnx.export(model, str(tmp_path / "m"), input_spec=spec, opset_version=13)
    prep = Preprocessing.create(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False)  # PP-OCR det and cls
    card, _ = graft_file(tmp_path / "m.onnx", tmp_path / "m.cam.onnx", prep=prep)
    assert card["task"] == task
    explainer = Explainer(tmp_path / "m.cam.onnx")
    line = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    x = paddle.to_tensor(((line / 255.0 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)).transpose(2, 0, 1)[None]
                         .astype(np.float32))  # fmt: skip
    theirs = model(x).numpy()[0]
    result = explainer.explain(line)
    if kind == "classifier":
        assert result.predictions[0].index == int(theirs.argmax())
        np.testing.assert_allclose(result.predictions[0].probability, theirs.max(), rtol=1e-4)
    else:  # the share of the pixels the detector finds text in
        np.testing.assert_allclose(result.predictions[0].probability, (theirs > 0.5).mean(), atol=1 / theirs.size)
    rows = np.array([[0, 1]]) if kind == "classifier" else np.array([[0]])
    finite_difference(tmp_path / "m.cam.onnx", card, explainer.prepare(line).model_input, rows)
