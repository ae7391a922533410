"""Segmenters and detectors grafted by ``export --from``: gradients against torch autograd (float64 reference,
float32 graph, as for classifiers), the in-graph non-maximum suppression against a numpy reference of
ultralytics' ``non_max_suppression``, and the refusal of an output layout onnxcam does not know."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from onnxcam import methods
from onnxcam.api import Explainer
from onnxcam.engine import Engine
from onnxcam.errors import OnnxcamError
from onnxcam_export.from_onnx import Preprocessing, graft_file
from tests.test_cli import assert_clean_failure, run
from tests.test_transformers import export_plain as export_torch

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional
UNIT = Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False)  # the models take pixel / 255
SIZE = 32
TOL = 1e-4  # relative to the largest magnitude, float32 graph vs float64 autograd


class TinySegmenter(nn.Module):
    """Features at stride 2, a 1x1 classifier, the masks upsampled to the input (as DeepLab/FCN heads)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU())
        self.classifier = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.classifier(self.features(x)), size=x.shape[2:], mode="bilinear")


class TinyDetector(nn.Module):
    """An ultralytics-style anchor-free detector with two scales (strides 4 and 8): raw output
    ``[N, 4 + K, A]``, cx, cy, w, h in input pixels and sigmoid class scores, A = anchors of both scales."""

    def __init__(self, classes: int = 3, size: int = SIZE) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.box = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 4, 1))
                                 for _ in range(2))  # fmt: skip
        self.cls = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, classes, 1))
                                 for _ in range(2))  # fmt: skip
        for i, stride in enumerate((4, 8)):
            cells = torch.arange(size // stride, dtype=torch.float32) + 0.5
            grid = torch.stack(torch.meshgrid(cells, cells, indexing="xy")).reshape(1, 2, -1)
            self.register_buffer(f"grid{i}", grid * stride)
        self.strides = (4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.scales(x), 2)

    def scales(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each scale's ``[N, 4 + K, anchors]``, finest first."""
        p3 = self.stem(x)
        outs = []
        for i, feature in enumerate((p3, self.down(p3))):
            box = self.box[i](feature).flatten(2)
            stride, grid = self.strides[i], getattr(self, f"grid{i}")
            xywh = torch.cat([grid + torch.tanh(box[:, :2]) * stride, torch.exp(box[:, 2:]) * 4 * stride], 1)
            outs.append(torch.cat([xywh, torch.sigmoid(self.cls[i](feature).flatten(2))], 1))
        return outs


class TinyYolov5(TinyDetector):
    """The classic YOLOv5 layout ``[N, A, 5 + K]``: cx, cy, w, h, sigmoid objectness and class probabilities."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__(classes + 1)  # the first "class" channel is the objectness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).transpose(1, 2)


def export_plain(model: nn.Module, path: Path, dynamo: bool = False) -> Path:
    """The model as a user has it (:func:`tests.test_transformers.export_plain`), at the scenes' size."""
    export_torch(model.eval(), (SIZE, SIZE), path, dynamo, output="out")
    return path


def grafted(model: nn.Module, folder: Path, dynamo: bool = False, **options: object) -> tuple[Path, dict]:
    source = export_plain(model, folder / "plain.onnx", dynamo)
    card, _ = graft_file(source, folder / "plain.cam.onnx", prep=UNIT, **options)
    return folder / "plain.cam.onnx", card


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _as_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float64) / 255).permute(0, 3, 1, 2)


def forward_with(model: nn.Module, layer: nn.Module, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(the output of ``layer``, the model's output) in float64, for torch autograd."""
    (output,), out = forward_at(model, [layer], images)
    return output, out


def forward_at(
    model: nn.Module, layers: list[nn.Module], images: np.ndarray
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(the output of each of ``layers``, the model's output) in float64, for torch autograd."""
    model = model.double()
    store: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: store.append(o)) for layer in layers]
    out = model(_as_input(images))
    for hook in hooks:
        hook.remove()
    return store, out


def street_photo(folder: Path) -> np.ndarray:
    """A 64x48 random RGB photo, written as ``street.png`` in ``folder`` (onnxcam resizes it to 32x32)."""
    photo = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / "street.png"), photo[:, :, ::-1])
    return photo


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- semantic segmentation ----------------------------------------------------------------------------
def segment_scores(masks: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
    """[N, T]: sum of class c's logits over the pixels predicted as c (SemanticSegmentationTarget)."""
    predicted = masks.argmax(1)
    rows = []
    for t in range(classes.shape[1]):
        c = torch.from_numpy(classes[:, t])
        chosen = masks.gather(1, c[:, None, None, None].expand(-1, 1, *masks.shape[2:]))[:, 0]
        rows.append((chosen * (predicted == c[:, None, None])).sum((1, 2)))
    return torch.stack(rows, 1)


EXPORTERS = ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)]  # torch.onnx's two exporters


@pytest.fixture(scope="module", params=EXPORTERS)
def segmenter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, dict]:
    torch.manual_seed(0)
    model = TinySegmenter()
    path, card = grafted(model, tmp_path_factory.mktemp("seg"), dynamo=request.param == "dynamo")
    return model, path, card


def test_segmenter_is_recognised_and_explained_at_its_last_feature_layer(segmenter: tuple) -> None:
    _, _, card = segmenter
    assert card["task"] == "segmentation"
    assert "(16x16x16)" in card["layer"], "the features before the 1x1 classifier, not the masks"


def test_segmenter_gradients_match_torch_autograd(segmenter: tuple) -> None:
    model, path, _ = segmenter
    engine = Engine(path)
    images = _images(2, seed=3)
    targets = np.array([[2, -1, 0], [-2, 1, 3]], dtype=np.int64)
    out = engine.run(images, targets, full_gradients=True)
    activations, masks = forward_with(model, model.features, images)
    scores = segment_scores(masks, out.target_classes)
    grads = np.stack([torch.autograd.grad(scores[:, t].sum(), activations, retain_graph=True)[0].numpy()
                      for t in range(targets.shape[1])], axis=1)  # fmt: skip
    all_scores = segment_scores(masks, np.tile(np.arange(4), (2, 1))).detach().numpy()
    assert _rel(out.logits, all_scores) < TOL, "logits are the masked sums of every class"
    assert out.target_classes[0, 1] == np.argsort(-all_scores[0])[0], "-1: the class with the largest masked sum"
    assert out.target_classes[1, 0] == np.argsort(-all_scores[1])[1], "-2: the second"
    assert _rel(out.activations, activations.detach().numpy()) < TOL
    assert _rel(out.gradients, grads) < TOL
    assert _rel(out.weights, grads.mean(axis=(3, 4))) < TOL
    assert np.abs(grads).max() > 0, "the reference must not be trivially zero"


def test_a_segmenters_predictions_are_the_share_of_pixels_each_class_holds(tmp_path: Path) -> None:
    """A softmax over the masked sums is no probability of anything (present classes showed 0.0000): a
    segmenter's prediction is the fraction of the input's pixels predicted as the class."""
    torch.manual_seed(0)
    model = TinySegmenter()
    images = _images(2, seed=5)
    with torch.no_grad():  # centred logits: every class holds pixels
        model.classifier.bias -= forward_with(model, model.features, images)[1].mean((0, 2, 3))
    path, _ = grafted(model.float(), tmp_path)
    _, masks = forward_with(model, model.features, images)
    predicted = masks.argmax(1).numpy()
    expected = np.stack([np.bincount(p.ravel(), minlength=4) / p.size for p in predicted])
    assert (expected > 0).sum() >= 3, "the reference must show several classes"
    np.testing.assert_allclose(Engine(path).run(images, np.full((2, 1), -1)).pixel_shares, expected, atol=1e-7)
    for photo, shares in zip(images, expected, strict=True):
        predictions = Explainer(path).explain(photo, predictions=4).predictions
        assert [p.index for p in predictions] == list(np.argsort(-shares, kind="stable"))
        np.testing.assert_allclose([p.probability for p in predictions], np.sort(shares)[::-1], atol=1e-7)


class TinyTextDetector(nn.Module):
    """A DBNet-style text detector: features at stride 4, upsampled back by two ConvTranspose, one sigmoid
    probability map ``[N, 1, H, W]`` (``[N, H, W, 1]`` with ``channels_last``)."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(16, 8, 2, 2), nn.BatchNorm2d(8), nn.ReLU())
        self.prob = nn.ConvTranspose2d(8, 1, 2, 2)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.prob(self.up(self.features(x))))
        return p.permute(0, 2, 3, 1) if self.channels_last else p


@pytest.mark.parametrize("channels_last", [False, True], ids=["N1HW", "NHW1"])
def test_a_one_channel_map_is_a_segmenter_of_its_foreground(channels_last: bool, tmp_path: Path) -> None:
    """Text detection, portrait or salient-object masks: the explained score is the foreground logit (before the
    Sigmoid) summed over the pixels the model calls foreground (probability above 0.5); the prediction is the
    foreground's share of the pixels."""
    torch.manual_seed(0)
    model = TinyTextDetector(channels_last).eval()
    images = _images(2, seed=7)
    with torch.no_grad():  # half the pixels foreground, none of them near the threshold (float32 vs float64)
        logits = model.prob(model.up(model.features(_as_input(images).float()))).flatten().sort().values.unique()
        middle = len(logits) // 2
        model.prob.bias -= (logits[middle - 1] + logits[middle]) / 2
    path, card = grafted(model, tmp_path)
    assert card["task"] == "segmentation" and Engine(path).card.labels == ("foreground",)
    assert "(8x16x16)" in card["layer"], "the last feature layer, before the one-channel map"
    out = Engine(path).run(images, np.zeros((2, 1), np.int64), full_gradients=True)
    (features,), _ = forward_at(model, [model.up], images)
    logit = model.prob(features)
    foreground = logit > 0
    score = (logit * foreground).sum((1, 2, 3))
    (grads,) = torch.autograd.grad(score.sum(), features)
    assert 0.05 < foreground.double().mean() < 0.95, "the reference must hold both foreground and background"
    assert logit.abs().min() > 1e-5, "no pixel so near the threshold that float32 and float64 disagree"
    assert _rel(out.logits[:, 0], score.detach().numpy()) < TOL
    assert _rel(out.gradients[:, 0], grads.numpy()) < TOL
    np.testing.assert_allclose(out.pixel_shares[:, 0], foreground.double().mean((1, 2, 3)).numpy(), atol=1e-7)


@pytest.mark.parametrize("batch", [{}, {"x": {0: "batch_size"}}], ids=["batch 1", "batch named batch_size"])
def test_a_segmenter_of_any_batch_declaration_grafts(batch: dict, tmp_path: Path) -> None:
    """torchvision's DeepLabV3 exported as is has a batch of 1; other exports name the batch as they like."""
    torch.manual_seed(0)
    model = TinySegmenter().eval()
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), tmp_path / "seg.onnx", dynamo=False,
                          input_names=["x"], output_names=["out"], dynamic_axes=batch, opset_version=17)  # fmt: skip
    graft_file(tmp_path / "seg.onnx", tmp_path / "seg.cam.onnx", prep=UNIT)
    images = _images(1, seed=6)
    out = Engine(tmp_path / "seg.cam.onnx").run(images, np.array([[0, 1, 2, 3]]))
    _, masks = forward_with(model, model.features, images)
    assert _rel(out.logits, segment_scores(masks, np.arange(4)[None]).detach().numpy()) < TOL


# -- ultralytics-style detectors ----------------------------------------------------------------------
ANCHORS, CLASSES = 80, 3  # TinyDetector at 32x32: 8x8 + 4x4 anchors


def ultralytics_nms(raw: np.ndarray, conf: float, iou: float) -> list[tuple[int, int, float, np.ndarray]]:
    """Kept detections of one image's raw output ``[4 + K, A]`` as ultralytics' ``non_max_suppression``
    (default, not agnostic): each anchor takes its best class, those above ``conf`` are suppressed per
    class greedily by score at IoU > ``iou``. (anchor, class, score, x1y1x2y2), best first."""
    scores = raw[4:]
    cx, cy, w, h = raw[:4].astype(np.float64)
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    best, score = scores.argmax(0), scores.max(0)
    kept: list[int] = []
    for a in sorted(np.flatnonzero(score > conf), key=lambda a: -score[a]):
        others = [k for k in kept if best[k] == best[a]]
        if not others:
            kept.append(a)
            continue
        low, high = np.maximum(boxes[others, :2], boxes[a, :2]), np.minimum(boxes[others, 2:], boxes[a, 2:])
        inter = np.prod(np.clip(high - low, 0, None), axis=1)
        area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
        if np.all(inter / (area(boxes[others]) + area(boxes[a]) - inter) <= iou):
            kept.append(a)
    return [(int(a), int(best[a]), float(score[a]), boxes[a]) for a in kept]


@pytest.fixture(scope="module", params=EXPORTERS)
def detector(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, dict]:
    torch.manual_seed(0)
    model = TinyDetector(CLASSES)
    path, card = grafted(model, tmp_path_factory.mktemp("det"), dynamo=request.param == "dynamo")
    return model, path, card


def test_detector_is_recognised_with_its_head_inputs_as_target_layers(detector: tuple) -> None:
    _, path, card = detector
    assert card["task"] == "detection" and len(Engine(path).card.labels) == CLASSES
    assert "(16x8x8)" in card["layer"], "the stride-4 features: the first scale's head input"
    (second,) = card["extra_layers"]
    assert second.endswith("(16x4x4)"), "the stride-8 features: the second scale's head input"


def test_detector_gradients_of_box_scores_match_torch_autograd(detector: tuple) -> None:
    model, path, _ = detector
    engine = Engine(path)
    images = _images(2, seed=5)
    anchors, classes = np.array([[3, 70, 41], [79, 0, 12]]), np.array([[0, 2, 1], [1, 1, 0]])
    targets = np.concatenate([classes * ANCHORS + anchors, [[-1], [-2]]], axis=1)
    out = engine.run(images, targets, full_gradients=True, thresholds={"conf_threshold": 0.0})
    assert np.array_equal(out.box_anchors[:, :3], anchors) and np.array_equal(out.target_classes[:, :3], classes)
    activations, raw = forward_with(model, model.stem, images)
    n = torch.arange(2)[:, None]
    scores = raw[n, 4 + torch.from_numpy(out.target_classes), torch.from_numpy(out.box_anchors)]  # [N, T]
    grads = np.stack([torch.autograd.grad(scores[:, t].sum(), activations, retain_graph=True)[0].numpy()
                      for t in range(targets.shape[1])], axis=1)  # fmt: skip
    assert _rel(out.logits, raw[:, 4:].detach().numpy()) < TOL
    assert _rel(out.box_scores, scores.detach().numpy()) < TOL
    assert _rel(out.activations, activations.detach().numpy()) < TOL
    assert _rel(out.gradients, grads) < TOL
    assert _rel(out.weights, grads.mean(axis=(3, 4))) < TOL


def test_in_graph_nms_keeps_the_boxes_of_ultralytics_nms(detector: tuple) -> None:
    model, path, _ = detector
    engine = Engine(path)
    images, rows = _images(3, seed=11), 12
    conf, iou = 0.52, 0.3
    out = engine.run(images, -np.tile(np.arange(1, rows + 1), (3, 1)), thresholds={"conf_threshold": conf,
                     "iou_threshold": iou})  # fmt: skip
    with torch.no_grad():
        raw = model.float()(_as_input(images).float()).numpy()
    suppressed = 0
    for n in range(3):
        expected = ultralytics_nms(raw[n], conf, iou)[:rows]
        suppressed += int((raw[n, 4:].max(0) > conf).sum()) - len(ultralytics_nms(raw[n], conf, iou))
        found = out.box_anchors[n] >= 0
        assert found.sum() == len(expected) > 0
        pairs = zip(out.box_anchors[n][found], out.target_classes[n][found], strict=True)
        assert [(a, c) for a, c, _, _ in expected] == list(pairs)
        np.testing.assert_allclose(out.box_scores[n][found], [s for _, _, s, _ in expected], rtol=1e-6)
        np.testing.assert_allclose(out.boxes[n][found], [b for *_, b in expected], rtol=1e-5, atol=1e-4)
        assert not out.boxes[n][~found].any() and (out.target_classes[n][~found] == -1).all()
    assert suppressed > 0, "the NMS must have suppressed boxes for the comparison to mean something"


def test_missing_detection_rows_have_zero_gradients(detector: tuple) -> None:
    _, path, _ = detector
    out = Engine(path).run(_images(1), np.array([[-1, -2]]), full_gradients=True,
                           thresholds={"conf_threshold": 0.999})  # fmt: skip
    assert (out.box_anchors == -1).all() and not out.gradients.any() and not out.weights.any()


def test_unknown_output_layout_is_refused_naming_the_outputs(tmp_path: Path) -> None:
    class Pairs(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x).flatten(2).transpose(1, 2)  # [N, H*W, 3]: no layout onnxcam knows

    source = export_plain(Pairs(), tmp_path / "pairs.onnx")
    with pytest.raises(OnnxcamError, match=r"the model's outputs \('out' \[.*, 1024, 3\]\) are not a layout") as e:
        graft_file(source, tmp_path / "pairs.cam.onnx", prep=UNIT)
    assert "--task" in str(e.value) and "\n" not in str(e.value)


# -- the command line -----------------------------------------------------------------------------------
def test_cli_explains_each_kept_detection_with_its_box(detector: tuple, tmp_path: Path) -> None:
    model, path, _ = detector
    photo = street_photo(tmp_path)
    out = tmp_path / "out"
    result = run("explain", str(tmp_path / "street.png"), "--model", str(path), "--conf", "0.52", "--iou", "0.3",
                 "--top-k", "5", "--out", str(out), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    targets = json.loads(result.stdout)["images"][0]["targets"]
    with torch.no_grad():
        raw = model.float()(_as_input(cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA)[None]).float())
    expected = ultralytics_nms(raw[0].numpy(), 0.52, 0.3)[:5]
    assert [t["rank"] for t in targets] == list(range(1, len(expected) + 1)) and len(expected) >= 2
    assert [t["class"] for t in targets] == [c for _, c, _, _ in expected]
    np.testing.assert_allclose([t["probability"] for t in targets], [s for _, _, s, _ in expected], atol=1e-5)
    scale = np.array([64 / SIZE, 48 / SIZE] * 2)
    clipped = [np.clip(b * scale, 0, [64, 48, 64, 48]) for *_, b in expected]  # to the photo, as ultralytics
    np.testing.assert_allclose([t["box"] for t in targets], clipped, atol=0.02)
    assert len({t["overlay"] for t in targets}) == len(targets), "one overlay per detection, even of one class"
    assert all(Path(t["overlay"]).is_file() and len(t["peak_xy"]) == 2 for t in targets)
    assert {t["boxes"] for t in targets} == {str(out / "street_boxes.png")} and (out / "street_boxes.png").is_file()
    nothing = run("explain", str(tmp_path / "street.png"), "--model", str(path), "--conf", "0.999", "--out",
                  str(tmp_path / "none"), "--json")  # fmt: skip
    assert nothing.returncode == 0, "no detection is an answer, not an error (#22 item 8)"
    doc = json.loads(nothing.stdout)
    assert doc["images"][0]["detections"] == 0 and doc["images"][0]["targets"] == []
    assert doc["summary"]["explained"] == 1 and doc["summary"]["failed"] == 0
    assert '"label": "no detection"' in (tmp_path / "none" / "index.html").read_text()
    table = run("explain", str(tmp_path / "street.png"), "--model", str(path), "--conf", "0.999", "--out",
                str(tmp_path / "none-table"))  # fmt: skip
    assert table.returncode == 0 and "no detection above the confidence threshold" in table.stdout


def test_cli_explains_a_segmenter_class_by_name(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("sky\nroad\ncar\nperson\n")
    source = export_plain(TinySegmenter(), tmp_path / "seg.onnx")
    made = run("export", "--from", str(source), "--labels", str(labels), "--mean", "0", "0", "0", "--std", "1", "1",
               "1")  # fmt: skip
    assert made.returncode == 0 and "semantic segmentation" in made.stdout, made.stderr
    photo = np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "road.png"), photo)
    result = run("explain", str(tmp_path / "road.png"), "--model", str(tmp_path / "seg.cam.onnx"), "--target",
                 "road", "--out", str(tmp_path / "out"), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (target,) = json.loads(result.stdout)["images"][0]["targets"]
    assert (target["class"], target["label"]) == (1, "road") and Path(target["overlay"]).is_file()
    table = run("explain", str(tmp_path / "road.png"), "--model", str(tmp_path / "seg.cam.onnx"), "--out",
                str(tmp_path / "table"))  # fmt: skip
    assert "class       pixels  label" in table.stdout and "probability" not in table.stdout, table.stdout
    refused = run("explain", str(tmp_path / "road.png"), "--model", str(tmp_path / "seg.cam.onnx"), "--conf", "0.3",
                  "--out", str(tmp_path / "refused"))  # fmt: skip
    assert_clean_failure(refused, "--conf and --iou apply to detectors")
    assert_clean_failure(run("eval", str(tmp_path / "road.png"), "--model", str(tmp_path / "seg.cam.onnx")),
                         "onnxcam eval measures a classifier's maps", "segmentation model")  # fmt: skip
    assert not (tmp_path / "refused").exists(), "refused before anything is written"


# -- the classic YOLOv5 layout ----------------------------------------------------------------------------
def yolov5_scores(raw: torch.Tensor) -> torch.Tensor:
    """``[N, 4 + K, A]``: the boxes and objectness x class probability, as YOLOv5's NMS scores them."""
    channels = raw.transpose(1, 2)
    return torch.cat([channels[:, :4], channels[:, 5:] * channels[:, 4:5]], 1)


def test_yolov5_layout_explains_objectness_times_class_probability(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TinyYolov5(CLASSES)
    path, card = grafted(model, tmp_path)
    assert card["task"] == "detection" and "YOLOv5" in card["notes"]
    engine = Engine(path)
    images, conf, iou = _images(2, seed=9), 0.27, 0.3
    targets = np.concatenate([[[2 * ANCHORS + 5], [1 * ANCHORS + 60]], -np.tile(np.arange(1, 9), (2, 1))], axis=1)
    out = engine.run(images, targets, full_gradients=True, thresholds={"conf_threshold": conf, "iou_threshold": iou})
    activations, raw = forward_with(model, model.stem, images)
    scored = yolov5_scores(raw)
    for n in range(2):
        expected = ultralytics_nms(scored[n].detach().numpy(), conf, iou)[:8]
        found = out.box_anchors[n, 1:] >= 0
        assert found.sum() == len(expected) >= 2
        assert [(a, c) for a, c, _, _ in expected] == list(
            zip(out.box_anchors[n, 1:][found], out.target_classes[n, 1:][found], strict=True)
        )
    rows = torch.arange(2)[:, None]
    valid = torch.from_numpy(out.box_anchors.clip(0))
    scores = scored[rows, 4 + torch.from_numpy(out.target_classes.clip(0)), valid]  # [N, T]
    grads = np.stack([torch.autograd.grad(scores[:, t].sum(), activations, retain_graph=True)[0].numpy()
                      for t in range(targets.shape[1])], axis=1)  # fmt: skip
    grads[out.box_anchors < 0] = 0  # a row without a k-th detection explains nothing
    assert _rel(out.box_scores[out.box_anchors >= 0], scores.detach().numpy()[out.box_anchors >= 0]) < TOL
    assert _rel(out.gradients, grads) < TOL


def test_what_a_detector_cannot_do_is_refused_in_one_line(detector: tuple, tmp_path: Path) -> None:
    _, path, _ = detector
    cv2.imwrite(str(tmp_path / "street.png"), _images(1)[0])
    model = ("--model", str(path))
    assert_clean_failure(run("audit", str(tmp_path), *model, "--boxes", str(tmp_path / "b.json")),
                         "onnxcam audit measures a classifier's")  # fmt: skip
    assert_clean_failure(run("web", str(path), "--out", str(tmp_path / "site")), "is a detection model; the page")
    assert_clean_failure(run("explain", str(tmp_path / "street.png"), *model, "--method", "scorecam", "--out",
                             str(tmp_path / "a")), "scorecam needs extra passes", "detection model")  # fmt: skip
    assert_clean_failure(run("explain", str(tmp_path / "street.png"), *model, "--target", "1", "--out",
                             str(tmp_path / "b")), "a detector explains its kept detections")  # fmt: skip
    every = run("explain", str(tmp_path / "street.png"), *model, "--method", "all", "--conf", "0.5", "--top-k", "1",
                "--out", str(tmp_path / "c"), "--json")  # fmt: skip
    assert every.returncode == 0, every.stderr
    ran = {t["method"] for t in json.loads(every.stdout)["images"][0]["targets"]}
    assert "scorecam" not in ran and {"gradcam", "hirescam", "eigencam"} <= ran


def test_eval_scores_each_kept_box_against_its_own_box(detector: tuple, tmp_path: Path) -> None:
    _, path, _ = detector
    for n, image in enumerate(_images(3, seed=21)):
        cv2.imwrite(str(tmp_path / f"street{n}.png"), image)
    options = ("--model", str(path), "--method", "hirescam", "--conf", "0.52", "--json")
    evaluated = run("eval", *[str(tmp_path / f"street{n}.png") for n in range(3)], *options)
    assert evaluated.returncode == 0, evaluated.stderr
    rows = json.loads(evaluated.stdout)["images"]
    for row in rows:  # against explain's boxes and map peaks for the same image
        explained = run("explain", row["path"], *options, "--out", str(tmp_path / Path(row["path"]).stem))
        targets = json.loads(explained.stdout)["images"][0]["targets"]
        boxes = [[round(v) for v in t["box"]] for t in targets]  # the pixels a box covers, its ends included
        inside = [b[0] <= t["peak_xy"][0] <= b[2] and b[1] <= t["peak_xy"][1] <= b[3]
                  for b, t in zip(boxes, targets, strict=True)]  # fmt: skip
        assert row["detections"] == len(targets) > 0 and row["box_pointing_game"] == pytest.approx(np.mean(inside))
        assert 0 < row["box_energy_pointing_game"] <= 1
    assert_clean_failure(run("eval", rows[0]["path"], *options[:2], "--road"), "--road do not apply")


# -- several target layers: a detector's scales ---------------------------------------------------------
SCALES = "/stem/stem.3/Relu_output_0,/down/down.1/Relu_output_0"  # TinyDetector's two scales (stride 4, 8)


def scale_cam_image(cam: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """pytorch-grad-cam's ``scale_cam_image`` for one map: min-max, then an OpenCV resize to (w, h). Its
    ``1e-7`` guard on the max is left out: these random-weight maps peak near 1e-5, where it would shift
    values by 1%; onnxcam guards an all-zero map instead."""
    cam = cam - cam.min()
    cam = cam / cam.max()
    return cv2.resize(cam.astype(np.float32), size) if size is not None else cam


def test_several_layers_give_each_scale_its_gradients_and_average_the_maps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyDetector(CLASSES)
    path, _ = grafted(model, tmp_path, layer=SCALES)
    engine = Engine(path)
    assert len(engine.card.extra_layers) == 1 and list(engine.card.saliency_methods) == methods.in_graph()
    images = _images(1, seed=4)
    targets = np.array([[1 * ANCHORS + 10, 0 * ANCHORS + 70, 2 * ANCHORS + 40]])
    out = engine.run(images, targets, full_gradients=True)
    store, raw = forward_at(model, [model.stem, model.down], images)
    scores = raw[0, 4 + torch.from_numpy(out.target_classes[0]), torch.from_numpy(out.box_anchors[0])]
    layers = [(out.activations, out.weights, out.gradients), *out.scales]
    for (activations, weights, gradients), reference in zip(layers, store, strict=True):
        grads = np.stack([torch.autograd.grad(s, reference, retain_graph=True)[0][0].numpy() for s in scores])
        assert _rel(activations[0], reference[0].detach().numpy()) < TOL
        assert _rel(gradients[0], grads) < TOL and _rel(weights[0], grads.mean(axis=(2, 3))) < TOL

    explained = Explainer(path).explain(images[0], method="gradcam", conf=0.0, top_k=3)
    kept = engine.run(images, np.array([[-1, -2, -3]]), thresholds={"conf_threshold": 0.0})  # the same rows
    layers = [(kept.activations, kept.weights), *[scale[:2] for scale in kept.scales]]
    for t, found in enumerate(explained.maps):  # pytorch-grad-cam's aggregate_multi_layers on the graph's outputs
        cams = [np.maximum(np.einsum("c,chw->hw", w[0, t], a[0]), 0) for a, w in layers]
        size = cams[0].shape[::-1]  # the finest grid, (w, h) for OpenCV
        expected = np.maximum(np.mean([scale_cam_image(c, size) for c in cams], axis=0), 0)
        np.testing.assert_allclose(scale_cam_image(found.cam_lowres), scale_cam_image(expected), atol=1e-5)


def test_in_graph_saliency_of_each_box_aggregates_the_scales_as_the_python_path(detector: tuple) -> None:
    """The file alone explains each kept box: its ``saliency`` averages the scales' min-max scaled maps at the
    finest grid, then upsamples to the input, as :func:`maps.aggregate` does (checked against pytorch-grad-cam's
    recipe above); the image is at the model's size, so the Python map is too."""
    _, path, _ = detector
    explainer, images = Explainer(path), _images(1, seed=4)
    assert list(explainer.card.saliency_methods) == methods.in_graph()
    rows, low = np.array([[-1, -2, -3, -4]]), {"conf_threshold": 0.0}
    for name in explainer.card.saliency_methods:
        out = explainer.engine.run(images, rows, thresholds=low, saliency=name)
        found = explainer.explain(images[0], method=name, conf=0.0, top_k=4).maps
        assert out.saliency.shape == (1, 4, SIZE, SIZE) and len(found) == 4
        for t, expected in enumerate(found):
            assert expected.rank == t + 1 and not expected.empty
            assert float(np.abs(out.saliency[0, t] - expected.cam).max()) <= 1e-5, f"{name}, box {t + 1}"


def test_a_kth_detection_row_needs_no_rows_before_it(detector: tuple) -> None:
    _, path, _ = detector
    engine, images, low = Engine(path), _images(2, seed=13), {"conf_threshold": 0.5}
    every = engine.run(images, np.array([[-1, -2, -3, -4], [-1, -2, -3, -4]]), full_gradients=True, thresholds=low)
    alone = engine.run(images, np.array([[-4, -2], [-3, 7]]), full_gradients=True, thresholds=low)
    assert (every.box_anchors >= 0).all(), "four kept boxes per image, for the comparison to mean something"
    for (n, t), (m, s) in {(0, 3): (0, 0), (0, 1): (0, 1), (1, 2): (1, 0)}.items():
        assert (
            every.box_anchors[n, t] == alone.box_anchors[m, s]
            and every.target_classes[n, t] == alone.target_classes[m, s]
        )
        np.testing.assert_allclose(alone.gradients[m, s], every.gradients[n, t], rtol=1e-5, atol=1e-9)


def test_a_forced_task_that_the_output_does_not_have_is_refused(tmp_path: Path) -> None:
    source = export_plain(TinyDetector(CLASSES), tmp_path / "det.onnx")
    with pytest.raises(
        OnnxcamError, match=r"the model's outputs \('out' \[.*, 7, 80\]\) are not a segmentation output"
    ):
        graft_file(source, tmp_path / "det.cam.onnx", prep=UNIT, task="segmentation")
    card, _ = graft_file(source, tmp_path / "det.cam.onnx", prep=UNIT, task="detection")
    assert card["task"] == "detection"


def test_window_walk_matches_autograd_at_borders_shared_pixels_and_across_scales(detector: tuple) -> None:
    """The detector's backward runs box by box over windows (:mod:`onnxcam_export.windowed`): targets at the
    corner anchors of both scales (windows that hang over the map's edge), two classes of one anchor and a
    repeated row (one pixel, several targets: more than one round of the tail), and the second scale's boxes,
    whose gradient reaches the first scale's features through the stride-2 convolution between them."""
    model, path, _ = detector
    assert "windows" in Engine(path).card.notes
    first, last = 0, (SIZE // 4) ** 2  # the anchors of the stride-4 scale, then those of the stride-8 one
    anchors = np.array([first, last - 1, last, ANCHORS - 1, 70, 70, 70, 37])
    classes = np.array([0, 1, 2, 1, 0, 1, 1, 2])
    targets = np.stack([classes * ANCHORS + anchors, (classes * ANCHORS + anchors)[::-1]])
    images = _images(2, seed=21)
    out = Engine(path).run(images, targets, full_gradients=True)
    store, raw = forward_at(model, [model.stem, model.down], images)
    n = torch.arange(2)[:, None]
    scores = raw[n, 4 + torch.from_numpy(out.target_classes), torch.from_numpy(out.box_anchors)]  # [N, T]
    for (weights, gradients), reference in zip([(out.weights, out.gradients), *[s[1:] for s in out.scales]], store,
                                               strict=True):  # fmt: skip
        grads = np.stack([torch.autograd.grad(scores[:, t].sum(), reference, retain_graph=True)[0].numpy()
                          for t in range(targets.shape[1])], axis=1)  # fmt: skip
        assert _rel(gradients, grads) < TOL and _rel(weights, grads.mean(axis=(3, 4))) < TOL


class CoarseFirst(TinyDetector):
    """Its anchors run coarse scale first: not the order the window walk assumes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.scales(x)[::-1], 2)


def test_a_detector_the_window_walk_does_not_fit_keeps_the_dense_walk(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CoarseFirst(CLASSES)
    path, _ = grafted(model, tmp_path)
    engine = Engine(path)
    assert "whole feature maps" in engine.card.notes
    images, targets = _images(1, seed=3), np.array([[5, ANCHORS + 20, -1]])
    out = engine.run(images, targets, full_gradients=True)
    activations, raw = forward_with(model, model.down, images)
    scores = raw[0, 4 + torch.from_numpy(out.target_classes[0]), torch.from_numpy(out.box_anchors[0])]
    grads = np.stack([torch.autograd.grad(s, activations, retain_graph=True)[0][0].numpy() for s in scores])
    assert out.gradients.shape[3:] == (SIZE // 8, SIZE // 8), "its coarse scale comes first, so its layer is first"
    assert _rel(out.gradients[0], grads) < TOL


# -- ultralytics' segment, pose and OBB exports: rows after the class scores ------------------------------------------
class TinyYoloExtras(TinyDetector):
    """An ultralytics -seg or -pose head: ``[N, 4 + K + E, A]``, E values per anchor after the class scores (mask
    coefficients, keypoints), and for -seg a prototype output ``[N, E, 8, 8]``."""

    def __init__(self, extra: int, protos: bool) -> None:
        super().__init__(CLASSES)
        self.extra = nn.ModuleList(nn.Conv2d(16, extra, 1) for _ in range(2))
        self.protos = nn.Conv2d(16, extra, 1) if protos else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        store: list[torch.Tensor] = []
        hook = self.stem.register_forward_hook(lambda m, i, o: store.append(o))  # (the stem, run once by scales)
        detections = torch.cat(self.scales(x), 2)
        hook.remove()
        (p3,) = store
        coefficients = torch.cat([self.extra[0](p3).flatten(2), self.extra[1](self.down(p3)).flatten(2)], 2)
        out = torch.cat([detections, coefficients], 1)
        if self.protos is None:
            return out
        return out, self.protos(p3)  # (at a quarter of the input, as ultralytics' Proto)


def _with_ultralytics_metadata(path: Path, task: str, **more: str) -> Path:
    import onnx

    model = onnx.load(path)
    meta = {"author": "Ultralytics", "task": task, "imgsz": f"[{SIZE}, {SIZE}]",
            "names": str({i: f"shape {i}" for i in range(CLASSES)}), **more}  # fmt: skip
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in meta.items())
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("kind", ["segment", "segment without metadata", "pose"])
def test_ultralytics_masks_and_keypoints_are_no_classes(kind: str, tmp_path: Path) -> None:
    """A -seg export's 32 mask coefficients and a -pose export's keypoints per anchor were read as classes (K + 32
    "classes", or a refusal that the names do not match); the classes are the metadata's names, or the rows left
    beside the prototype output's channels."""
    torch.manual_seed(0)
    model = TinyYoloExtras(extra=8 if kind != "pose" else 9, protos=kind != "pose").eval()
    source = tmp_path / "yolo.onnx"
    export_torch(model, (SIZE, SIZE), source, False, output=("output0", "output1") if kind != "pose" else "output0")
    if kind != "segment without metadata":
        _with_ultralytics_metadata(source, kind, **({"kpt_shape": "[3, 3]"} if kind == "pose" else {}))
    prep = {} if "without" not in kind else {"prep": UNIT}
    card, notes = graft_file(source, tmp_path / "yolo.cam.onnx", **prep)
    assert card["task"] == "detection" and len(Engine(tmp_path / "yolo.cam.onnx").card.labels) == CLASSES
    what = "keypoints" if kind == "pose" else "instance masks' coefficients"
    assert any(f"the last {9 if kind == 'pose' else 8} values per anchor are no classes (its {what})" in n
               for n in notes), notes  # fmt: skip
    engine = Engine(tmp_path / "yolo.cam.onnx")
    images = _images(2, seed=5)
    anchors, classes = np.array([[3, 70], [79, 0]]), np.array([[0, 2], [1, 1]])
    out = engine.run(images, classes * ANCHORS + anchors, full_gradients=True)
    activations, raw = forward_with(model, model.stem, images)
    raw = raw[0] if isinstance(raw, tuple) else raw
    assert _rel(out.logits, raw[:, 4 : 4 + CLASSES].detach().numpy()) < TOL
    n = torch.arange(2)[:, None]
    scores = raw[n, 4 + torch.from_numpy(classes), torch.from_numpy(anchors)]
    grads = np.stack([torch.autograd.grad(scores[:, t].sum(), activations, retain_graph=True)[0].numpy()
                      for t in range(2)], axis=1)  # fmt: skip
    assert _rel(out.gradients, grads) < TOL


def test_an_ultralytics_obb_model_is_refused_with_what_it_is(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = tmp_path / "obb.onnx"
    export_torch(TinyYoloExtras(extra=1, protos=False).eval(), (SIZE, SIZE), source, False, output="output0")
    _with_ultralytics_metadata(source, "obb")
    assert_clean_failure(run("export", "--from", str(source)), "rotated boxes", "axis-aligned")
    assert not (tmp_path / "obb.cam.onnx").exists()


def process_mask(protos: np.ndarray, coefficients: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """ultralytics' ``ops.process_mask(..., upsample=True)`` in numpy: ``coefficients [T, E] @ protos [E, h, w]``,
    upsampled bilinearly to ``size`` (half-pixel centres, as ``F.interpolate``), above 0, zero outside each box
    (x1, y1, x2, y2 at ``size``; ``crop_mask``)."""
    extra, height, width = protos.shape
    logits = (coefficients @ protos.reshape(extra, -1)).reshape(-1, height, width)
    masks = np.stack([cv2.resize(m, size[::-1], interpolation=cv2.INTER_LINEAR) for m in logits]) > 0
    cols, rows = np.arange(size[1])[None, None, :], np.arange(size[0])[None, :, None]
    x1, y1, x2, y2 = (boxes[:, k, None, None] for k in range(4))
    return masks & (cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)


def test_an_instance_segmenters_masks_are_ultralytics_process_mask(tmp_path: Path) -> None:
    """One mask per kept detection, from its coefficients and the prototypes, upsampled and cropped to its box (as
    ultralytics' ``process_mask``); drawn with its box."""
    from onnxcam.api import instance_mask

    torch.manual_seed(0)
    model = TinyYoloExtras(extra=8, protos=True).eval()
    source = tmp_path / "seg.onnx"
    export_torch(model, (SIZE, SIZE), source, False, output=("output0", "output1"))
    _with_ultralytics_metadata(source, "segment")
    graft_file(source, tmp_path / "seg.cam.onnx")
    images = _images(2, seed=5)
    explainer = Explainer(tmp_path / "seg.cam.onnx")
    out = explainer.engine.run(images, -np.tile(np.arange(1, 6), (2, 1)), thresholds={"conf_threshold": 0.0})
    with torch.no_grad():
        raw, protos = (t.numpy() for t in model.float()(_as_input(images).float()))
    for n in range(2):
        kept = out.box_anchors[n] >= 0
        assert kept.sum() == 5
        coefficients = raw[n][4 + CLASSES :, out.box_anchors[n][kept]].T
        logits = (coefficients @ protos[n].reshape(8, -1)).reshape(-1, 8, 8)
        assert _rel(out.instance_masks[n][kept], logits) < TOL
        expected = process_mask(protos[n], coefficients, out.boxes[n][kept], (SIZE, SIZE))
        placement = explainer.prepare(images[n]).placement  # (the input itself: the photo is the input)
        ours = np.stack([instance_mask(out.instance_masks[n, t], out.boxes[n, t], placement)
                         for t in np.flatnonzero(kept)])  # fmt: skip
        assert expected.any() and np.array_equal(ours, expected)
    photo = street_photo(tmp_path)
    result = explainer.explain(photo, top_k=3, conf=0.0)
    assert all(m.mask is not None and m.mask.shape == photo.shape[:2] and m.mask.any() for m in result.maps)
    for m in result.maps:  # inside its box, within the pixel the box's edge falls in
        x1, y1, x2, y2 = m.box
        ys, xs = np.nonzero(m.mask)
        assert x1 - 1 <= xs.min() and xs.max() <= x2 + 1 and y1 - 1 <= ys.min() and ys.max() <= y2 + 1
    run_out = tmp_path / "out"
    result = run("explain", str(tmp_path / "street.png"), "--model", str(tmp_path / "seg.cam.onnx"), "--top-k", "3",
                 "--conf", "0", "--out", str(run_out), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    targets = json.loads(result.stdout)["images"][0]["targets"]
    assert [t["mask_pixels"] for t in targets] == [int(m.mask.sum()) for m in explainer.explain(
        photo, top_k=3, conf=0.0).maps]  # fmt: skip
