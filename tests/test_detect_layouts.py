"""Detectors with a pair of outputs, grafted by ``export --from``: SSD/RetinaNet-style class scores and decoded
boxes, and DETR's logits and normalised boxes; and a segmenter's class explained over a user's mask. Gradients
against torch autograd (float64 reference, float32 graph, as in :mod:`tests.test_detect`), the kept detections
against numpy references (per-class NMS as torchvision's ``batched_nms`` for SSD, the queries by score for DETR),
the layout told from the outputs' names and shapes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam.engine import Engine
from onnxcam.errors import OnnxcamError
from onnxcam_export.from_onnx import graft_file
from tests.test_cli import assert_clean_failure, run
from tests.test_detect import (
    EXPORTERS,
    SIZE,
    TOL,
    UNIT,
    TinySegmenter,
    _as_input,
    _images,
    _rel,
    forward_at,
    street_photo,
)
from tests.test_detect import grafted as grafted_segmenter
from tests.test_transformers import export_plain

torch = pytest.importorskip("torch")
nn = torch.nn
CLASSES = 4  # SSD's: the background at 0 and three objects
SSD_ANCHORS = 16 * 16 + 8 * 8  # one anchor per cell at strides 2 and 4: more than a DETR has queries
QUERIES = 6


def _grid(cells: int, stride: int) -> torch.Tensor:
    """[1, 2, cells * cells] cell centres in input pixels, x first."""
    centres = torch.arange(cells, dtype=torch.float32) + 0.5
    return torch.stack(torch.meshgrid(centres, centres, indexing="xy")).reshape(1, 2, -1) * stride


class TinySsd(nn.Module):
    """SSD-style, two scales (strides 2 and 4), one anchor per cell: softmax class scores ``[N, A, K]`` (the
    background at 0) and boxes decoded to x1, y1, x2, y2 pixels ``[N, A, 4]`` (or cx, cy, w, h)."""

    def __init__(self, cxcywh: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.cls = nn.ModuleList(nn.Conv2d(16, CLASSES, 3, 1, 1) for _ in range(2))
        self.reg = nn.ModuleList(nn.Conv2d(16, 4, 3, 1, 1) for _ in range(2))
        for conv in self.cls:  # scores that differ between anchors, as a trained head's
            nn.init.normal_(conv.weight, std=0.3)
        for i, stride in enumerate((2, 4)):
            self.register_buffer(f"grid{i}", _grid(SIZE // stride, stride))
        self.cxcywh = cxcywh

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p2 = self.stem(x)
        scores, boxes = [], []
        for i, (feature, stride) in enumerate(((p2, 2), (self.down(p2), 4))):
            scores.append(self.cls[i](feature).flatten(2).transpose(1, 2))
            d = self.reg[i](feature).flatten(2)
            centre = getattr(self, f"grid{i}") + torch.tanh(d[:, :2]) * stride
            boxes.append(torch.cat([centre, torch.exp(d[:, 2:]) * 3 * stride], 1).transpose(1, 2))
        xywh = torch.cat(boxes, 1)
        if not self.cxcywh:
            xywh = torch.cat([xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2], 2)
        return torch.softmax(torch.cat(scores, 1), 2), xywh


class TinyDetr(nn.Module):
    """DETR-style: a conv backbone (8x8 at 32x32), learned queries attending to its grid (and added back), per
    query K + 1 class logits (the last: no object; without ``no_object``, K logits that sigmoids score, as RT-DETR's)
    and a box cx, cy, w, h normalised to the input (sigmoid)."""

    def __init__(self, classes: int = 4, queries: int = QUERIES, no_object: bool = True) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.queries = nn.Parameter(torch.randn(queries, 16))
        self.key, self.value = nn.Linear(16, 16), nn.Linear(16, 16)
        self.cls, self.box = nn.Linear(16, classes + no_object), nn.Linear(16, 4)
        nn.init.normal_(self.box.weight, std=0.05)  # boxes near the centre that overlap, as one object's queries

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.backbone(x).flatten(2).transpose(1, 2)  # [N, h*w, 16]
        attention = torch.softmax(self.queries @ self.key(tokens).transpose(1, 2) / 4, 2)  # [N, Q, h*w]
        hidden = attention @ self.value(tokens) + self.queries  # the query's own part, as DETR's residual
        return self.cls(hidden), torch.sigmoid(self.box(hidden))


def grafted(
    model: nn.Module, folder: Path, names: tuple[str, str], dynamo: bool = False, **options: object
) -> tuple[Path, dict, list[str]]:
    """``model`` exported with outputs ``names`` and grafted: (file, card, notes)."""
    export_plain(model.eval(), (SIZE, SIZE), folder / "plain.onnx", dynamo, output=names)
    card, notes = graft_file(folder / "plain.onnx", folder / "plain.cam.onnx", prep=UNIT, **options)
    return folder / "plain.cam.onnx", card, notes


def gradients(scores: torch.Tensor, activations: torch.Tensor) -> np.ndarray:
    """d scores[:, t] / d activations for each t: [N, T, C, h, w]."""
    return np.stack([torch.autograd.grad(scores[:, t].sum(), activations, retain_graph=True)[0].numpy()
                     for t in range(scores.shape[1])], axis=1)  # fmt: skip


def xyxy(xywh: np.ndarray) -> np.ndarray:
    return np.concatenate([xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2], -1)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> list[int]:
    """torchvision.ops.batched_nms: greedy NMS within each class, the kept indices by decreasing score."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        same = [k for k in kept if classes[k] == classes[i]]
        low, high = np.maximum(boxes[same, :2], boxes[i, :2]), np.minimum(boxes[same, 2:], boxes[i, 2:])
        inter = np.prod(np.clip(high - low, 0, None), axis=1)
        if np.all(inter / (area[same] + area[i] - inter) <= iou):
            kept.append(int(i))
    return kept


def ssd_detections(scores: np.ndarray, boxes: np.ndarray, conf: float, iou: float) -> list[tuple[int, int, float]]:
    """One image's kept (anchor, class, score), best first: each anchor takes its best class but the background
    (column 0), those above ``conf`` go through :func:`batched_nms`."""
    best = scores[:, 1:].argmax(1) + 1
    score = scores[np.arange(len(scores)), best]
    candidates = np.flatnonzero(score > conf)
    kept = batched_nms(boxes[candidates].astype(np.float64), score[candidates], best[candidates], iou)
    return [(int(candidates[k]), int(best[candidates[k]]), float(score[candidates[k]])) for k in kept]


# -- SSD/RetinaNet: class scores and decoded boxes ---------------------------------------------------------
@pytest.fixture(scope="module", params=EXPORTERS)
def ssd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, dict]:
    torch.manual_seed(0)
    model = TinySsd()
    path, card, _ = grafted(model, tmp_path_factory.mktemp("ssd"), ("scores", "boxes"),
                            request.param == "dynamo", background=0)  # fmt: skip
    return model, path, card


def test_ssd_pair_is_recognised_with_its_background_in_the_card(ssd: tuple) -> None:
    _, path, card = ssd
    assert card["task"] == "detection" and "SSD" in card["notes"] and card["background"] == 0
    engine = Engine(path)
    assert engine.card.background == 0 and engine.card.labels[0] == "background" and len(engine.card.labels) == 4
    assert len(card["extra_layers"]) == 1, "a scale per head input, as an ultralytics detector's"


def test_ssd_gradients_of_anchor_class_scores_match_torch_autograd(ssd: tuple) -> None:
    model, path, _ = ssd
    images = _images(2, seed=5)
    anchors, classes = np.array([[3, 300, 41], [319, 0, 12]]), np.array([[1, 3, 0], [2, 2, 1]])
    out = Engine(path).run(images, classes * SSD_ANCHORS + anchors, full_gradients=True)
    assert np.array_equal(out.box_anchors, anchors) and np.array_equal(out.target_classes, classes)
    layers, (scores, boxes) = forward_at(model, [model.stem, model.down], images)
    picked = scores[torch.arange(2)[:, None], torch.from_numpy(anchors), torch.from_numpy(classes)]  # [N, T]
    assert _rel(out.logits, scores.transpose(1, 2).detach().numpy()) < TOL, "the scores as the model outputs them"
    for (activations, weights, grads), layer in zip(
        [(out.activations, out.weights, out.gradients), *out.scales], layers, strict=True
    ):
        expected = gradients(picked, layer)
        assert _rel(activations, layer.detach().numpy()) < TOL and np.abs(expected).max() > 0
        assert _rel(grads, expected) < TOL and _rel(weights, expected.mean(axis=(3, 4))) < TOL
    kept = classes != 0  # (the background's own score is a logit, never a box's score)
    assert _rel(out.box_scores[kept], picked.detach().numpy()[kept]) < TOL
    assert _rel(out.boxes, boxes.detach().numpy()[np.arange(2)[:, None], anchors]) < TOL


def test_ssd_kth_detections_are_those_of_batched_nms_never_the_background(ssd: tuple) -> None:
    model, path, _ = ssd
    images, rows, conf, iou = _images(3, seed=11), 12, 0.33, 0.3
    out = Engine(path).run(images, -np.tile(np.arange(1, rows + 1), (3, 1)), thresholds={"conf_threshold": conf,
                           "iou_threshold": iou})  # fmt: skip
    with torch.no_grad():
        scores, boxes = (t.numpy() for t in model.float()(_as_input(images).float()))
    suppressed = 0
    for n in range(3):
        every = ssd_detections(scores[n], boxes[n], conf, iou)
        suppressed += int((scores[n, :, 1:].max(1) > conf).sum()) - len(every)
        found = out.box_anchors[n] >= 0
        assert found.sum() == len(every[:rows]) > 1
        assert [(a, c) for a, c, _ in every[:rows]] == list(zip(out.box_anchors[n][found], out.target_classes[n][found],
                                                                 strict=True))  # fmt: skip
        np.testing.assert_allclose(out.box_scores[n][found], [s for *_, s in every[:rows]], rtol=1e-6)
        np.testing.assert_allclose(out.boxes[n][found], boxes[n][[a for a, *_ in every[:rows]]], rtol=1e-5, atol=1e-4)
    assert (scores[:, :, 0] > scores[:, :, 1:].max(2)).any(), "anchors whose best class is the background"
    assert suppressed > 0, "the NMS must have suppressed boxes for the comparison to mean something"


def test_ssd_boxes_given_as_cxcywh_come_out_as_corners(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinySsd(cxcywh=True)
    path, _, notes = grafted(model, tmp_path, ("scores", "boxes"), box_format="cxcywh")
    assert any("cxcywh" in note for note in notes)
    anchors = np.array([[5, 200, 319]])
    out = Engine(path).run(_images(1), 2 * SSD_ANCHORS + anchors)
    with torch.no_grad():
        _, xywh = model.float()(_as_input(_images(1)).float())
    np.testing.assert_allclose(out.boxes[0], xyxy(xywh[0, anchors[0]].numpy()), rtol=1e-5, atol=1e-4)


# -- DETR: logits and normalised boxes, a set (no NMS) --------------------------------------------------------
def detr_detections(logits: np.ndarray, boxes: np.ndarray, conf: float) -> list[tuple[int, int, float, np.ndarray]]:
    """One image's detections as DETR's PostProcess scores them, best first: per query the softmax over K + 1
    without the no-object column, its best class above ``conf``; the box cx, cy, w, h scaled to input pixels."""
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities = (probabilities / probabilities.sum(1, keepdims=True))[:, :-1]
    best, score = probabilities.argmax(1), probabilities.max(1)
    pixels = xyxy(boxes.astype(np.float64) * SIZE)
    return [(int(q), int(best[q]), float(score[q]), pixels[q]) for q in np.argsort(-score) if score[q] > conf]


@pytest.fixture(scope="module", params=EXPORTERS)
def detr(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, dict]:
    torch.manual_seed(3)
    model = TinyDetr()
    path, card, _ = grafted(model, tmp_path_factory.mktemp("detr"), ("pred_logits", "pred_boxes"),
                            request.param == "dynamo")  # fmt: skip
    return model, path, card


def test_detr_is_recognised_and_suppresses_nothing(detr: tuple) -> None:
    _, path, card = detr
    engine = Engine(path)
    assert card["task"] == "detection" and "DETR" in card["notes"] and len(engine.card.labels) == 4
    assert card["score"] == "probability", "DETR's PostProcess score, a softmax probability"
    assert "iou_threshold" not in engine.inputs and "conf_threshold" in engine.inputs
    with pytest.raises(OnnxcamError, match="set-prediction detector"):
        engine.run(_images(1), np.array([[-1]]), thresholds={"iou_threshold": 0.5})


def test_detr_gradients_of_query_class_probabilities_match_torch_autograd(detr: tuple) -> None:
    model, path, _ = detr
    images = _images(2, seed=7)
    queries, classes = np.array([[0, 5, 2], [3, 3, 1]]), np.array([[2, 0, 3], [0, 2, 1]])
    out = Engine(path).run(images, classes * QUERIES + queries, full_gradients=True)
    (activations,), (logits, _) = forward_at(model, [model.backbone], images)
    probabilities = torch.softmax(logits, 2)[..., :-1]  # [N, Q, K]
    picked = probabilities[torch.arange(2)[:, None], torch.from_numpy(queries), torch.from_numpy(classes)]
    expected = gradients(picked, activations)
    assert _rel(out.logits, probabilities.transpose(1, 2).detach().numpy()) < TOL
    assert _rel(out.box_scores, picked.detach().numpy()) < TOL
    assert _rel(out.activations, activations.detach().numpy()) < TOL and np.abs(expected).max() > 0
    assert _rel(out.gradients, expected) < TOL and _rel(out.weights, expected.mean(axis=(3, 4))) < TOL


def test_detr_kth_detections_are_its_queries_by_score_boxes_in_pixels(detr: tuple) -> None:
    model, path, _ = detr
    images, conf = _images(3, seed=2), 0.3
    out = Engine(path).run(images, -np.tile(np.arange(1, QUERIES + 2), (3, 1)), thresholds={"conf_threshold": conf})
    with torch.no_grad():
        logits, boxes = (t.numpy() for t in model.float()(_as_input(images).float()))
    overlapping = 0
    for n in range(3):
        expected = detr_detections(logits[n], boxes[n], conf)
        found = out.box_anchors[n] >= 0
        assert found.sum() == len(expected) > 1 and not found[-1], "one row more than queries: never found"
        assert [(q, c) for q, c, *_ in expected] == list(zip(out.box_anchors[n][found], out.target_classes[n][found],
                                                              strict=True))  # fmt: skip
        np.testing.assert_allclose(out.box_scores[n][found], [s for _, _, s, _ in expected], rtol=1e-5)
        np.testing.assert_allclose(out.boxes[n][found], [b for *_, b in expected], rtol=1e-5, atol=1e-4)
        kept = batched_nms(np.array([b for *_, b in expected]), np.array([s for _, _, s, _ in expected]),
                           np.zeros(len(expected)), 0.45)  # fmt: skip
        overlapping += len(expected) - len(kept)
    assert overlapping > 0, "boxes an NMS would have suppressed (IoU > 0.45), for 'no suppression' to mean something"


# -- sigmoid DETRs (RT-DETR, Conditional and Deformable DETR): every query and class a detection -------------
def sigmoid_detections(logits: np.ndarray, boxes: np.ndarray, conf: float) -> list[tuple[int, int, float]]:
    """One image's detections as RT-DETR's and Conditional DETR's post-processing ranks them: the sigmoid of
    every (query, class) logit, top-k over all of them, those above ``conf``."""
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))  # [Q, K]
    order = np.argsort(-scores.ravel(), kind="stable")
    return [(int(i // scores.shape[1]), int(i % scores.shape[1]), float(scores.ravel()[i])) for i in order
            if scores.ravel()[i] > conf]  # fmt: skip


def hf_config(folder: Path, model_type: str, classes: int = 4) -> None:
    (folder / "config.json").write_text(json.dumps({"model_type": model_type,
                                                    "id2label": {str(i): f"thing {i}" for i in range(classes)}}))


def test_a_sigmoid_detr_scores_each_query_and_class_as_its_post_processing(tmp_path: Path) -> None:
    """An RT-DETR export (optimum's names, logits and pred_boxes) was read as DETR's softmax over K + 1, its last
    class dropped as 'no object'. Its config.json's model_type says which it is."""
    torch.manual_seed(4)
    model = TinyDetr(no_object=False)
    with torch.no_grad():  # two classes of one query above the threshold, as every_class must keep
        model.cls.bias.copy_(torch.tensor([1.5, 1.0, -1.0, -2.0]))
    tmp_path.mkdir(exist_ok=True)
    export_plain(model.eval(), (SIZE, SIZE), tmp_path / "plain.onnx", False, output=("logits", "pred_boxes"))
    hf_config(tmp_path, "rt_detr")
    card, _ = graft_file(tmp_path / "plain.onnx", tmp_path / "plain.cam.onnx", prep=UNIT)
    path = tmp_path / "plain.cam.onnx"
    assert card["task"] == "detection" and "sigmoid" in card["notes"] and len(Engine(path).card.labels) == 4
    assert card["score"] == "probability" and "iou_threshold" not in Engine(path).inputs
    images, conf, rows = _images(2, seed=8), 0.4, QUERIES * 4 + 1
    out = Engine(path).run(images, -np.tile(np.arange(1, rows + 1), (2, 1)), thresholds={"conf_threshold": conf},
                           full_gradients=True)  # fmt: skip
    (activations,), (logits, _) = forward_at(model, [model.backbone], images)
    for n in range(2):
        expected = sigmoid_detections(logits[n].detach().numpy(), None, conf)
        found = out.box_anchors[n] >= 0
        assert found.sum() == len(expected) > QUERIES, "more detections than queries: classes of one query each"
        assert [(q, c) for q, c, _ in expected] == list(zip(out.box_anchors[n][found], out.target_classes[n][found],
                                                             strict=True))  # fmt: skip
        np.testing.assert_allclose(out.box_scores[n][found], [s for *_, s in expected], rtol=1e-5)
    probabilities = torch.sigmoid(logits)  # [N, Q, K]
    rows_found = out.box_anchors >= 0
    anchors, classes = np.where(rows_found, out.box_anchors, 0), np.where(rows_found, out.target_classes, 0)
    picked = probabilities[torch.arange(2)[:, None], torch.from_numpy(anchors), torch.from_numpy(classes)]
    picked = picked * torch.from_numpy(rows_found)
    expected = gradients(picked, activations)
    assert _rel(out.gradients, expected) < TOL and np.abs(expected).max() > 0


def test_the_two_detrs_are_told_apart_by_the_family_a_name_or_the_flag_never_guessed(tmp_path: Path) -> None:
    torch.manual_seed(4)
    for folder in ("bare", "detr", "forced"):
        (tmp_path / folder).mkdir()
    export_plain(TinyDetr(no_object=False).eval(), (SIZE, SIZE), tmp_path / "bare" / "m.onnx", False,
                 output=("logits", "pred_boxes"))  # fmt: skip
    with pytest.raises(OnnxcamError, match=r"fit two detectors.*--detector-layout detr or detr-sigmoid"):
        graft_file(tmp_path / "bare" / "m.onnx", tmp_path / "bare" / "m.cam.onnx", prep=UNIT)
    assert not (tmp_path / "bare" / "m.cam.onnx").exists()
    card, _ = graft_file(tmp_path / "bare" / "m.onnx", tmp_path / "bare" / "m.cam.onnx", prep=UNIT,
                         layout="detr-sigmoid")  # fmt: skip
    assert "sigmoid" in card["notes"]
    export_plain(TinyDetr().eval(), (SIZE, SIZE), tmp_path / "detr" / "m.onnx", False, output=("logits", "pred_boxes"))
    hf_config(tmp_path / "detr", "detr")
    card, _ = graft_file(tmp_path / "detr" / "m.onnx", tmp_path / "detr" / "m.cam.onnx", prep=UNIT)
    assert "K + 1" in card["notes"] and card["sources"]["family"] == "sidecar config.json"


# -- which layout: names, shapes, the flag ---------------------------------------------------------------------
def test_a_pair_of_unnamed_outputs_is_told_by_its_anchor_count_or_forced(tmp_path: Path) -> None:
    for folder in ("detr", "ssd", "forced"):
        (tmp_path / folder).mkdir()
    torch.manual_seed(3)
    _, card, _ = grafted(TinyDetr(classes=8, queries=10), tmp_path / "detr", ("out0", "out1"), layout="detr")
    assert "DETR" in card["notes"], "10 queries: a set predictor, although [N, 10, 9] alone would be YOLOv5's"
    _, card, _ = grafted(TinySsd(), tmp_path / "ssd", ("out0", "out1"))
    assert "SSD" in card["notes"] and "background" not in card, f"{SSD_ANCHORS} anchors; no background by default"
    _, card, _ = grafted(TinyDetr(), tmp_path / "forced", ("out0", "out1"), layout="ssd")
    assert "SSD" in card["notes"] and card["task"] == "detection"


def test_an_unknown_layout_or_a_layout_the_outputs_lack_is_refused_in_one_line(tmp_path: Path) -> None:
    class Triple(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flat = x.flatten(2).transpose(1, 2)  # [N, 1024, 3]
            return flat, flat[:, :512]  # no two outputs over the same anchors with boxes

    export_plain(Triple(), (SIZE, SIZE), tmp_path / "t.onnx", False, output=("a", "b"))
    with pytest.raises(OnnxcamError, match=r"outputs \('a' \[.*, 1024, 3\], 'b' \[.*, 512, 3\]\)") as e:
        graft_file(tmp_path / "t.onnx", tmp_path / "t.cam.onnx", prep=UNIT)
    assert "--detector-layout (ultralytics, yolov5, detr, detr-sigmoid, ssd)" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(OnnxcamError, match="not a detr detector's output"):
        graft_file(tmp_path / "t.onnx", tmp_path / "t.cam.onnx", prep=UNIT, layout="detr")
    with pytest.raises(OnnxcamError, match="unknown detector layout 'retina'; choose one of: ultralytics, yolov5"):
        graft_file(tmp_path / "t.onnx", tmp_path / "t.cam.onnx", prep=UNIT, layout="retina")


# -- the command line ------------------------------------------------------------------------------------------
def test_cli_explains_each_detr_query_with_its_box_in_photo_pixels(detr: tuple, tmp_path: Path) -> None:
    model, path, _ = detr
    photo = street_photo(tmp_path)
    out = tmp_path / "out"
    result = run("explain", str(tmp_path / "street.png"), "--model", str(path), "--conf", "0.3", "--top-k", "4",
                 "--out", str(out), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    targets = json.loads(result.stdout)["images"][0]["targets"]
    with torch.no_grad():
        logits, boxes = model.float()(_as_input(cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA)[None])
                                      .float())  # fmt: skip
    expected = detr_detections(logits[0].numpy(), boxes[0].numpy(), 0.3)[:4]
    assert len(targets) == len(expected) >= 2 and [t["class"] for t in targets] == [c for _, c, *_ in expected]
    scale = np.array([64 / SIZE, 48 / SIZE] * 2)
    clipped = [np.clip(b * scale, 0, [64, 48, 64, 48]) for *_, b in expected]
    np.testing.assert_allclose([t["box"] for t in targets], clipped, atol=0.02)
    assert len({t["overlay"] for t in targets}) == len(targets) and all(Path(t["overlay"]).is_file() for t in targets)
    assert (out / "street_boxes.png").is_file()
    refused = run("explain", str(tmp_path / "street.png"), "--model", str(path), "--iou", "0.5", "--out",
                  str(tmp_path / "refused"))  # fmt: skip
    assert_clean_failure(refused, "--iou applies to detectors that suppress", "DETR")
    masked = run("explain", str(tmp_path / "street.png"), "--model", str(path), "--mask", str(tmp_path / "street.png"),
                 "--out", str(tmp_path / "refused"))  # fmt: skip
    assert_clean_failure(masked, "--mask gives a segmenter the region to explain; this is a detection model")
    assert not (tmp_path / "refused").exists()


def test_cli_export_takes_the_layout_box_format_and_background(tmp_path: Path) -> None:
    torch.manual_seed(0)
    export_plain(TinySsd(cxcywh=True).eval(), (SIZE, SIZE), tmp_path / "ssd.onnx", False, output=("out0", "out1"))
    made = run("export", "--from", str(tmp_path / "ssd.onnx"), "--detector-layout", "ssd", "--box-format", "cxcywh",
               "--background", "0", "--mean", "0", "0", "0", "--std", "1", "1", "1")  # fmt: skip
    assert made.returncode == 0 and "background: 0" in made.stdout and "read as cxcywh" in made.stdout, made.stderr
    shown = run("info", str(tmp_path / "ssd.cam.onnx"))
    assert "background class 0 (background): never a detection" in shown.stdout
    for option, message in ((("--background", "4"), "--background 4 is not a class"),
                            (("--detector-layout", "yolo"), "unknown detector layout 'yolo'"),
                            (("--box-format", "corners"), "unknown box format 'corners'")):  # fmt: skip
        assert_clean_failure(run("export", "--from", str(tmp_path / "ssd.onnx"), *option), message)


# -- a segmenter's class over a user's mask -------------------------------------------------------------------
@pytest.fixture(scope="module", params=EXPORTERS)
def segmenter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(2)  # (its random weights predict two classes on the test images)
    model = TinySegmenter()
    path, _ = grafted_segmenter(model, tmp_path_factory.mktemp("seg"), dynamo=request.param == "dynamo")
    return model, path


def test_a_mask_explains_the_sum_of_a_class_logits_over_it(segmenter: tuple) -> None:
    model, path = segmenter
    images, targets = _images(2, seed=3), np.array([[2, 0], [1, 3]])
    region = (np.random.default_rng(1).random((2, SIZE, SIZE)) < 0.3).astype(np.float32)
    out = Engine(path).run(images, targets, full_gradients=True, region=region)
    (activations,), masks = forward_at(model, [model.features], images)
    weights = torch.from_numpy(region.astype(np.float64))[:, None]
    summed = (masks * weights).sum((2, 3))  # [N, K]: each class's SemanticSegmentationTarget(c, region)
    expected = gradients(summed[torch.arange(2)[:, None], torch.from_numpy(targets)], activations)
    assert _rel(out.logits, summed.detach().numpy()) < TOL and np.abs(expected).max() > 0
    assert _rel(out.gradients, expected) < TOL and _rel(out.weights, expected.mean(axis=(3, 4))) < TOL


def test_without_a_mask_a_class_is_explained_over_its_predicted_pixels(segmenter: tuple) -> None:
    model, path = segmenter
    engine, images = Engine(path), _images(2, seed=8)
    with torch.no_grad():
        predicted = model.float()(_as_input(images).float()).argmax(1).numpy()
    for c in range(4):
        default = engine.run(images, np.full((2, 1), c), full_gradients=True)
        given = engine.run(images, np.full((2, 1), c), full_gradients=True, region=(predicted == c).astype(np.float32))
        np.testing.assert_allclose(default.logits[:, c], given.logits[:, c], rtol=1e-6)
        np.testing.assert_allclose(default.gradients, given.gradients, rtol=1e-5, atol=1e-9)
    assert len(np.unique(predicted)) > 1, "several classes predicted, for the regions to differ"


def test_cli_explains_a_segmenter_class_over_a_mask_png(segmenter: tuple, tmp_path: Path) -> None:
    _, path = segmenter
    photo = np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 5:40] = 255
    cv2.imwrite(str(tmp_path / "road.png"), photo[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    model = ("--model", str(path), "--target", "1")
    result = run("explain", str(tmp_path / "road.png"), *model, "--mask", str(tmp_path / "mask.png"), "--out",
                 str(tmp_path / "out"), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (target,) = json.loads(result.stdout)["images"][0]["targets"]
    expected = Explainer(path).explain(photo, [1], mask=mask > 0).maps[0].cam
    np.testing.assert_allclose(np.load(target["map"]), expected, atol=1e-6)
    assert not np.allclose(expected, Explainer(path).explain(photo, [1]).maps[0].cam, atol=1e-3), "the mask matters"
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    cv2.imwrite(str(tmp_path / "black.png"), np.zeros((48, 64), np.uint8))
    cv2.imwrite(str(tmp_path / "small.png"), mask[10:20, 5:15])
    for name, message in (("garbage.png", "--mask: "), ("missing.png", "--mask: image"),
                          ("black.png", "has no non-zero pixel"), ("small.png", "the mask is 10x10 pixels but "
                                                                                 "the image is 64x48")):  # fmt: skip
        failed = run("explain", str(tmp_path / "road.png"), *model, "--mask", str(tmp_path / name), "--out",
                     str(tmp_path / name.replace(".", "-")))  # fmt: skip
        assert_clean_failure(failed, message)


def test_export_help_names_every_registered_layout_and_box_format() -> None:
    """The CLI does not import the exporter's registries (onnx costs every command a third of a second): its help
    names them, and this pins it to them."""
    from onnxcam_export.tasks import BOX_FORMATS, DETECTOR_LAYOUTS

    shown = " ".join(run("export", "--help").stdout.split())
    assert f"({', '.join(DETECTOR_LAYOUTS)})" in shown and f"as {' or '.join(BOX_FORMATS)}" in shown


def test_a_mask_reaches_masks_coarser_than_the_input_resized_in_the_graph(tmp_path: Path) -> None:
    class Coarse(TinySegmenter):
        """Masks at stride 2 (16x16 for a 32x32 input), not upsampled."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x))

    torch.manual_seed(2)
    model = Coarse()
    path, _ = grafted_segmenter(model, tmp_path)
    images, targets = _images(2, seed=3), np.array([[0, 3], [1, 2]])
    region = (np.random.default_rng(5).random((2, SIZE, SIZE)) < 0.5).astype(np.float32)
    out = Engine(path).run(images, targets, full_gradients=True, region=region)
    (activations,), masks = forward_at(model, [model.features], images)
    coarse = torch.nn.functional.avg_pool2d(torch.from_numpy(region.astype(np.float64))[:, None], 2)  # linear, 2:1
    summed = (masks * coarse).sum((2, 3))
    expected = gradients(summed[torch.arange(2)[:, None], torch.from_numpy(targets)], activations)
    assert _rel(out.logits, summed.detach().numpy()) < TOL
    assert _rel(out.gradients, expected) < TOL and np.abs(expected).max() > 0
