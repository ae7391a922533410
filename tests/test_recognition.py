"""CTC text recognisers grafted by ``export --from``: the greedy decoding in the graph against a numpy copy of
PaddleOCR's ``CTCLabelDecode``, each character's gradient against torch autograd (float64 reference, float32
graph), the labels with and without the blank, and what ``explain`` writes for a line of text."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam.engine import Engine
from onnxcam.errors import OnnxcamError
from onnxcam_export.from_onnx import Preprocessing, graft_file
from tests.test_cli import assert_clean_failure, run
from tests.test_transformers import export_plain

torch = pytest.importorskip("torch")
nn = torch.nn
UNIT = Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False)  # the model takes pixel / 255
SIZE = (32, 128)  # a text line: 32 rows, 128 columns; 32 steps of 4 columns
SYMBOLS = 12  # the blank and 11 characters
CHARACTERS = "abcdefghijk"  # the symbols but the blank, as PaddleOCR's dictionaries list them
TOL = 1e-4  # relative to the largest magnitude, float32 graph vs float64 autograd


class TinyRecogniser(nn.Module):
    """A CRNN without the LSTM (PaddleOCR's CTC heads after a convolutional neck): features at stride 4 x 8 kept
    4 rows high, averaged over the rows, mixed along the line and normalised, one softmax over the symbols per
    step."""

    def __init__(self, softmax: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, (2, 1), 1), nn.ReLU())  # fmt: skip
        self.mix = nn.Conv1d(16, 16, 3, 1, 1)
        self.norm = nn.LayerNorm(16)  # (as SVTR's neck)
        self.fc = nn.Linear(16, SYMBOLS)
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        steps = self.norm(torch.relu(self.mix(features.mean(2))).transpose(1, 2))  # [N, 32, 16]
        scores = self.fc(steps) * 4  # (peaked: a random model's best symbol changes along the line)
        return torch.softmax(scores, -1) if self.softmax else scores


def build(softmax: bool = True, favoured: int | None = 0) -> TinyRecogniser:
    """Seeded weights whose decoding of :func:`photos` holds characters, repeats and blanks (the bias of symbol
    ``favoured`` raised, as a trained CTC model favours its blank)."""
    torch.manual_seed(1)
    model = TinyRecogniser(softmax).eval()
    with torch.no_grad():
        if favoured is not None:
            model.fc.bias[favoured] += 0.7
    return model


def ctc_label_decode(probs: np.ndarray, blank: int = 0) -> list[tuple[list[int], list[float], list[list[int]]]]:
    """PaddleOCR's ``CTCLabelDecode.decode`` (``is_remove_duplicate=True``) on ``[N, T, K]`` probabilities, written
    as it is there: the symbols, their probabilities at their first step, and (ours) the steps of each."""
    decoded = []
    for p in probs:
        index, prob = p.argmax(axis=1), p.max(axis=1)
        selection = np.ones(len(index), dtype=bool)
        selection[1:] = index[1:] != index[:-1]
        selection &= index != blank
        starts = np.flatnonzero(selection)
        steps = []
        for s in starts:
            run_end = s
            while run_end + 1 < len(index) and index[run_end + 1] == index[s]:
                run_end += 1
            steps.append(list(range(s, run_end + 1)))
        decoded.append((index[selection].tolist(), prob[selection].tolist(), steps))
    return decoded


def photos(count: int, seed: int = 0) -> np.ndarray:
    """Lines of text's size holding blocks of random colours 4 to 24 columns wide, over noise (the random model
    decodes a few characters from each: the best symbol changes between blocks)."""
    rng = np.random.default_rng(seed)
    lines = rng.integers(0, 64, (count, *SIZE, 3)).astype(np.int64)
    for line in lines:
        start = 0
        while start < SIZE[1]:
            width = int(rng.integers(4, 25))
            line[:, start : start + width] += rng.integers(0, 192, 3)
            start += width
    return lines.astype(np.uint8)


@pytest.fixture(scope="module")
def recogniser(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, dict, list[str]]:
    model = build()
    folder = tmp_path_factory.mktemp("recogniser")
    export_plain(model, SIZE, folder / "rec.onnx", dynamo=False, output="softmax_0.tmp_0")
    (folder / "chars.txt").write_text("".join(f"{c}\n" for c in CHARACTERS))
    card, notes = graft_file(folder / "rec.onnx", folder / "rec.cam.onnx", labels=folder / "chars.txt", prep=UNIT)
    return model, folder / "rec.cam.onnx", card, notes


def test_a_per_step_softmax_is_read_as_a_ctc_recogniser_with_blank_0(recogniser: tuple) -> None:
    """It was refused before (and taken for a detector before that)."""
    _, path, card, notes = recogniser
    assert card["task"] == "recognition" and Engine(path).card.background == 0
    assert any("sequence recogniser" in n for n in notes) and any("symbol 0 the blank" in n for n in notes)
    assert any("lists the 11 characters; the blank is symbol 0" in n for n in notes)
    assert Engine(path).card.labels[0] == "<blank>" and len(Engine(path).card.labels) == SYMBOLS


def test_the_graph_decodes_as_paddleocr_and_each_character_gradient_equals_autograd(recogniser: tuple) -> None:
    model, path, _, _ = recogniser
    engine = Engine(path)
    images = photos(3)
    targets = np.tile(np.arange(32), (3, 1))
    out = engine.run(images, targets, full_gradients=True)
    x = torch.from_numpy(images.astype(np.float64) / 255).permute(0, 3, 1, 2)
    reference = copy.deepcopy(model).double()
    features = reference.features(x).detach().requires_grad_(True)
    probs = reference.head(features)
    decoded = ctc_label_decode(probs.detach().numpy())
    assert sum(len(d[0]) for d in decoded) >= 6, "the random model should decode several characters"
    assert any(len(s) > 1 for d in decoded for s in d[2]), "some character should span several steps"
    for n, (symbols, first_probs, steps) in enumerate(decoded):
        length = len(symbols)
        np.testing.assert_array_equal(out.characters[n], symbols + [-1] * (32 - length))
        np.testing.assert_allclose(out.character_probabilities[n, :length], first_probs, rtol=1e-5)
        assert not out.character_probabilities[n, length:].any() and not out.logits[n, length:].any()
        for j, (symbol, run_steps) in enumerate(zip(symbols, steps, strict=True)):
            score = probs[n, run_steps, symbol].sum()
            assert abs(out.logits[n, j] - score.item()) < 1e-5 * max(1.0, abs(score.item()))
            (grad,) = torch.autograd.grad(score, features, retain_graph=True)
            expected = grad[n].numpy()
            scale = np.abs(expected).max()
            assert scale > 0
            assert np.abs(out.gradients[n, j] - expected).max() / scale < TOL
            assert np.abs(out.weights[n, j] - expected.mean((1, 2))).max() / np.abs(expected.mean((1, 2))).max() < TOL
        assert not out.gradients[n, length:].any(), "a position beyond the text has no score, so no gradient"


def test_raw_step_scores_are_recognised_when_forced_and_a_last_blank_is_taken_from_background(
    tmp_path: Path,
) -> None:
    """A recogniser exported without its softmax (the logits ``[N, T, K]``) is a recogniser only when told;
    Keras' ``ctc_decode`` puts the blank last (--background K - 1)."""
    model = build(softmax=False, favoured=None)
    export_plain(model, SIZE, tmp_path / "rec.onnx", dynamo=False, output="logits")
    chars = tmp_path / "chars.txt"
    chars.write_text("".join(f"{c}\n" for c in CHARACTERS))
    card, _ = graft_file(tmp_path / "rec.onnx", tmp_path / "rec.cam.onnx", labels=chars, prep=UNIT,
                         task="recognition", background=SYMBOLS - 1)  # fmt: skip
    assert card["task"] == "recognition"
    explainer = Explainer(tmp_path / "rec.cam.onnx")
    assert explainer.labels == (*CHARACTERS, "<blank>")
    image = photos(1, seed=3)[0]
    result = explainer.explain(image)
    with torch.no_grad():
        x = torch.from_numpy(image[None] / 255.0).permute(0, 3, 1, 2)
        probs = torch.softmax(copy.deepcopy(model).double()(x), -1)
    symbols, first, _ = ctc_label_decode(probs.numpy(), blank=SYMBOLS - 1)[0]
    assert symbols, "the random model should decode a character"
    assert result.text == "".join(CHARACTERS[s] for s in symbols)
    assert [m.position for m in result.maps] == list(range(len(symbols)))
    np.testing.assert_allclose([p.probability for p in result.predictions], first, rtol=1e-5)


def test_character_lists_without_the_blank_and_paddleocrs_missing_space(tmp_path: Path) -> None:
    export_plain(build(), SIZE, tmp_path / "rec.onnx", dynamo=False)
    (tmp_path / "eleven.txt").write_text("".join(f"{c}\n" for c in CHARACTERS))
    graft_file(tmp_path / "rec.onnx", tmp_path / "rec.cam.onnx", labels=tmp_path / "eleven.txt", prep=UNIT)
    assert Engine(tmp_path / "rec.cam.onnx").card.labels == ("<blank>", *CHARACTERS)
    (tmp_path / "ten.txt").write_text("".join(f"{c}\n" for c in "abcdefghij"))
    with pytest.raises(OnnxcamError, match=r"gives 10 characters but the recogniser scores 12 symbols.*use_space_char"):
        graft_file(tmp_path / "rec.onnx", tmp_path / "ten.cam.onnx", labels=tmp_path / "ten.txt", prep=UNIT)
    assert not (tmp_path / "ten.cam.onnx").exists()


def test_explain_writes_the_text_and_a_map_per_character(recogniser: tuple, tmp_path: Path) -> None:
    import cv2

    _, path, _, _ = recogniser
    photo = tmp_path / "line.png"
    cv2.imwrite(str(photo), photos(1, seed=5)[0])
    explainer = Explainer(path)
    expected = explainer.explain(cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB))
    assert len(expected.text) >= 2
    out = tmp_path / "out"
    result = run("explain", str(photo), "--model", str(path), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    item = json.loads(result.stdout)["images"][0]
    assert item["text"] == expected.text
    assert [t["position"] for t in item["targets"]] == list(range(len(expected.text)))
    assert [t["label"] for t in item["targets"]] == list(expected.text)
    for t in item["targets"]:
        assert Path(t["overlay"]).is_file() and np.load(t["map"]).shape == (32, 128)
    assert item["text_probability"] == pytest.approx(np.mean([p.probability for p in expected.predictions]), 1e-5)
    one = run("explain", str(photo), "--model", str(path), "--out", str(tmp_path / "one"), "--target", "1",
              "--json")  # fmt: skip
    assert [t["position"] for t in json.loads(one.stdout)["images"][0]["targets"]] == [1], one.stderr
    table = run("explain", str(photo), "--model", str(path), "--out", str(tmp_path / "table"))
    assert f"text {expected.text!r}" in table.stdout and "character 0" in table.stdout, table.stderr
    beyond = run("explain", str(photo), "--model", str(path), "--out", str(tmp_path / "no"), "--target", "32")
    assert_clean_failure(beyond, "character position from 0 to 31")


def test_a_time_major_output_is_refused_with_how_to_transpose_it(tmp_path: Path) -> None:
    """A CRNN's ``[T, N, K]`` (torch's CTC loss takes it so) at batch 1 was read as one step of T images."""

    class TimeMajor(TinyRecogniser):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(super().forward(x).transpose(0, 1), -1)

    torch.manual_seed(0)
    source = tmp_path / "rec.onnx"
    with torch.no_grad():
        torch.onnx.export(TimeMajor(softmax=False).eval(), (torch.zeros(1, 3, *SIZE),), source, input_names=["x"],
                          output_names=["probs"], opset_version=17, dynamo=False)  # fmt: skip
    result = run("export", "--from", str(source), "--mean", "0", "0", "0", "--std", "1", "1", "1")
    assert_clean_failure(result, "[32, 1, 12]", "time-major", "permute(1, 0, 2)")


def test_a_space_in_the_character_list_is_a_character(tmp_path: Path) -> None:
    """PaddleOCR's dictionaries end with a line holding one space (``use_space_char``); the line was dropped."""
    export_plain(build(), SIZE, tmp_path / "rec.onnx", dynamo=False)
    (tmp_path / "keys.txt").write_text("".join(f"{c}\n" for c in "abcdefghij") + " \n")
    graft_file(tmp_path / "rec.onnx", tmp_path / "rec.cam.onnx", labels=tmp_path / "keys.txt", prep=UNIT)
    assert Engine(tmp_path / "rec.cam.onnx").card.labels == ("<blank>", *"abcdefghij", " ")


def test_what_a_recogniser_cannot_do_is_refused_and_a_short_text_still_recorded(recogniser: tuple,
                                                                               tmp_path: Path) -> None:  # fmt: skip
    import cv2

    _, path, _, _ = recogniser
    photo = tmp_path / "line.png"
    cv2.imwrite(str(photo), photos(1, seed=5)[0][:, :, ::-1])
    flipped = run("explain", str(photo), "--model", str(path), "--out", str(tmp_path / "a"), "--aug-smooth")
    assert_clean_failure(flipped, "reverses a line of text")
    text = Explainer(path).explain(photos(1, seed=5)[0]).text
    beyond = run("explain", str(photo), "--model", str(path), "--out", str(tmp_path / "b"), "--target",
                 str(len(text)), "--json")  # fmt: skip
    assert beyond.returncode == 0, beyond.stderr
    item = json.loads(beyond.stdout)["images"][0]
    assert item["text"] == text and item["targets"] == [] and len(item["predictions"]) == len(text)
