"""A real YOLOv8n (ultralytics, ``yolov8n.yaml`` with random weights) exported by ultralytics and grafted.

Runs where ultralytics imports (it needs torch and torchvision of matching releases: see the README);
skipped elsewhere, with the reason. Random weights are made to give spread-out scores: the batch
norms take the statistics of random images (else the activations fade layer by layer) and the class
biases are zero (ultralytics initialises them for near-zero scores).
Checks: the automatic target layers are the Detect head's three inputs, the in-graph non-maximum
suppression keeps what ultralytics' own ``non_max_suppression`` keeps, the gradients of box
scores at each of the three scales match torch autograd (float64) on the same weights, and a file
exported as users export it (fixed size, ultralytics' metadata) grafted with no flag at all gives,
on photos of five aspect ratios, the boxes, classes and scores of ``YOLO(file).predict`` on the
same file: its labels, its pixels / 255 and its letterbox come from the file's metadata.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from onnxcam.engine import Engine
from onnxcam_export.from_onnx import Preprocessing, graft_file

os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks, no downloads
try:
    import torch
    from ultralytics import YOLO
    from ultralytics.utils.nms import non_max_suppression
except Exception as exc:  # ImportError, or torchvision's operator errors when releases do not match
    pytest.skip(f"ultralytics does not import here ({type(exc).__name__}: {exc})"[:300], allow_module_level=True)

pytestmark = pytest.mark.slow
SIZE = 320  # 2100 anchors: the layout of 640, a quarter of the work
HEAD_INPUTS = [f"/model.{i}/cv2/act/Mul_output_0" for i in (15, 18, 21)]  # P3, P4, P5: what Detect reads


def _random_yolo(class_weights: float = 1.0, config: str = "yolov8n.yaml") -> YOLO:
    """YOLOv8n (or the ``config``: -seg, -pose) with seeded random weights whose scores spread out
    (``class_weights`` scales the class convolution: below 1 keeps real photos' scores away from 1.0, where ties
    would make the order ambiguous)."""
    torch.manual_seed(0)
    model = YOLO(config)
    for branch in model.model.model[-1].cv3:
        branch[-1].bias.data.zero_()
        branch[-1].weight.data *= class_weights
    for module in model.model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # the running statistics become those of one batch of random images
            module.reset_running_stats()
    with torch.no_grad():
        model.model.train()(_input(_images(4, seed=1), torch.float32))
    return model


def _export(model: YOLO, folder: Path, **options: object) -> Path:
    with warnings.catch_warnings(), contextlib.chdir(folder):  # it writes yolov8n.onnx into the working folder
        warnings.simplefilter("ignore")
        return folder / model.export(format="onnx", imgsz=SIZE, simplify=False, nms=False, opset=17, **options)


@pytest.fixture(scope="module")
def yolo(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    folder = tmp_path_factory.mktemp("yolo")
    model = _random_yolo()
    plain = _export(model, folder, dynamic=True)
    out = folder / "yolov8n.cam.onnx"
    card, _ = graft_file(plain, out, prep=Preprocessing.create((SIZE, SIZE), (0, 0, 0), (1, 1, 1), False))
    assert card["task"] == "detection"
    assert [layer.split()[0] for layer in [card["layer"], *card["extra_layers"]]] == HEAD_INPUTS
    return model.model.eval(), out


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _input(images: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype) / 255


def test_in_graph_nms_keeps_what_ultralytics_keeps(yolo: tuple) -> None:
    model, path = yolo
    images, conf, iou = _images(2), 0.8, 0.45
    out = Engine(path).run(images, -np.tile(np.arange(1, 31), (2, 1)), thresholds={"conf_threshold": conf,
                           "iou_threshold": iou})  # fmt: skip
    with torch.no_grad():
        raw = model.float()(_input(images, torch.float32))[0]
    kept, indices = non_max_suppression(raw, conf, iou, return_idxs=True)
    for n in range(2):
        found = out.box_anchors[n] >= 0
        expected = kept[n][:30].numpy()
        assert found.sum() == len(expected) > 5
        assert np.array_equal(out.box_anchors[n][found], indices[n][:30].numpy())
        assert np.array_equal(out.target_classes[n][found], expected[:, 5].astype(int))
        np.testing.assert_allclose(out.box_scores[n][found], expected[:, 4], rtol=1e-4)
        np.testing.assert_allclose(out.boxes[n][found], expected[:, :4], atol=0.05)


def test_box_score_gradients_match_torch_autograd(yolo: tuple) -> None:
    model, path = yolo
    engine = Engine(path)
    assert "windows" in engine.card.notes, "YOLOv8's head is one the window walk reproduces"
    images = _images(1)
    out = engine.run(images, np.array([[-1, -2, 5 * 2100 + 17, 79 * 2100 + 2099]]), full_gradients=True)
    model = model.double()
    store: list[torch.Tensor] = []
    hooks = [model.model[i].register_forward_hook(lambda m, i, o: store.append(o)) for i in (15, 18, 21)]
    raw = model(_input(images, torch.float64))[0]
    for hook in hooks:
        hook.remove()
    scores = raw[0, 4 + torch.from_numpy(out.target_classes[0]), torch.from_numpy(out.box_anchors[0])]
    for activations, (_, weights, gradients) in zip(store, [(None, out.weights, out.gradients), *out.scales],
                                                    strict=True):  # fmt: skip
        grads = np.stack([torch.autograd.grad(s, activations, retain_graph=True)[0][0].numpy() for s in scores])
        assert gradients.shape[2:] == activations.shape[1:]
        scale = np.abs(grads).max()
        np.testing.assert_allclose(gradients[0], grads, rtol=1e-4, atol=1e-4 * scale)
        np.testing.assert_allclose(weights[0], grads.mean(axis=(2, 3)), rtol=1e-4, atol=1e-4 * scale)


def _same_box(a: np.ndarray, b: np.ndarray) -> bool:
    """IoU >= 0.95, or (boxes clipped flat at the photo's edge have no area) corners within half a pixel."""
    inner = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None).prod()
    union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inner
    return bool(np.abs(a - b).max() <= 0.5 or (union > 0 and inner / union >= 0.95))


@pytest.mark.parametrize("task", ["detect", "segment", "pose"])
def test_a_deployed_export_is_explained_as_ultralytics_predicts_it(task: str, tmp_path: Path) -> None:
    """Also the -seg and -pose heads, whose mask coefficients (32) and keypoints (17 x 3) per anchor follow the
    class scores: they were read as 112 and 131 classes."""
    from onnxcam.api import Explainer
    from onnxcam.image import read_rgb

    model = _random_yolo(0.05, {"detect": "yolov8n.yaml", "segment": "yolov8n-seg.yaml",
                                "pose": "yolov8n-pose.yaml"}[task])  # fmt: skip
    names = 80 if task != "pose" else 1
    model.model.names = {i: f"thing {i}" for i in range(names)}
    plain = _export(model, tmp_path, dynamic=False)
    card, notes = graft_file(plain, tmp_path / "deployed.cam.onnx")  # no flag: everything from the file
    if task != "detect":
        extra = {"segment": "32 values per anchor are no classes (its instance masks' coefficients)",
                 "pose": "51 values per anchor are no classes (its keypoints)"}[task]  # fmt: skip
        assert any(extra in n for n in notes), notes
    assert card["resize"] == {"mode": "letterbox", "interpolation": "linear", "pad": 114}
    assert set(card["sources"].values()) == {"file metadata (ultralytics)", "the model's input"}
    explainer = Explainer(tmp_path / "deployed.cam.onnx")
    assert explainer.labels[-1] == f"thing {names - 1}" and len(explainer.labels) == names
    assert explainer.card.mean == (0, 0, 0) and explainer.card.std == (1, 1, 1)
    predictor = YOLO(plain, task=task)
    photo = read_rgb(Path(__file__).parents[1] / "examples" / "chelsea.png")  # 451x300
    views = {"3:2": photo, "2:3": photo.transpose(1, 0, 2), "2:1": photo[37:263], "1:3": photo[:, 200:300],
             "3:2 upscaled": photo[::3, ::3]}  # fmt: skip
    for name, view in views.items():
        view = np.ascontiguousarray(view)
        ours = explainer.explain(view, top_k=30, conf=0.5, iou=0.7).maps
        theirs = predictor.predict(view[:, :, ::-1].copy(), conf=0.5, iou=0.7, imgsz=SIZE, verbose=False)[0].boxes
        assert len(ours) == 30 and len(theirs) >= 30, name
        boxes, scores, classes = theirs.xyxy.numpy(), theirs.conf.numpy(), theirs.cls.numpy().astype(int)
        for m in ours:  # each kept box is one of ultralytics' (the order of equal scores may differ)
            match = [i for i in range(len(boxes)) if classes[i] == m.index and abs(scores[i] - m.probability) <= 0.01
                     and _same_box(np.asarray(m.box), boxes[i])]  # fmt: skip
            assert match, (name, m.box, m.probability, m.index)
        assert abs(ours[0].probability - scores[0]) < 1e-4, name


def test_a_deployed_classifier_export_is_explained_as_ultralytics_classifies(tmp_path: Path) -> None:
    """YOLOv8n-cls exported with its metadata (``task: classify``), grafted with no flag: the shorter side to the
    input by PIL's bilinear filter, the centre crop, pixels / 255 (``classify_transforms``), as its predictor."""
    from onnxcam.api import Explainer
    from onnxcam.image import read_rgb

    torch.manual_seed(0)
    model = YOLO("yolov8n-cls.yaml")
    for module in model.model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
            module.reset_running_stats()
    with torch.no_grad():
        model.model.train()(torch.rand(4, 3, 224, 224))
        model.model.model[-1].linear.weight.mul_(50)  # spread-out probabilities
    model.model.names = {i: f"kind {i}" for i in range(1000)}
    with warnings.catch_warnings(), contextlib.chdir(tmp_path):
        warnings.simplefilter("ignore")
        plain = tmp_path / model.export(format="onnx", imgsz=224, simplify=False, opset=17)
    card, _ = graft_file(plain, tmp_path / "cls.cam.onnx")
    assert card["resize"] == {"mode": "crop", "interpolation": "pil-bilinear", "shorter": 224}
    explainer, predictor = Explainer(tmp_path / "cls.cam.onnx"), YOLO(plain, task="classify")
    assert explainer.labels[5] == "kind 5"
    photo = read_rgb(Path(__file__).parents[1] / "examples" / "chelsea.png")
    for view in (photo, photo.transpose(1, 0, 2).copy(), photo[:, 150:300].copy()):
        ours = explainer.explain(view).predictions
        probs = predictor.predict(view[:, :, ::-1].copy(), imgsz=224, verbose=False)[0].probs
        assert [p.index for p in ours] == list(probs.top5)
        np.testing.assert_allclose([p.probability for p in ours], probs.data.numpy()[probs.top5], atol=1e-3)
        assert ours[0].probability - ours[4].probability > 0.01, "the scores are degenerate"


def test_a_segment_exports_masks_are_those_ultralytics_predicts(tmp_path: Path) -> None:
    """Each kept detection's mask (its coefficients times the prototypes, cropped to its box, upsampled to the
    input) is the mask of ``YOLO(file).predict`` for the same box, at the letterboxed input."""
    from onnxcam.api import Explainer, Prepared, instance_mask
    from onnxcam.image import read_rgb

    model = _random_yolo(0.05, "yolov8n-seg.yaml")
    plain = _export(model, tmp_path, dynamic=False)
    graft_file(plain, tmp_path / "seg.cam.onnx")
    explainer = Explainer(tmp_path / "seg.cam.onnx")
    photo = read_rgb(Path(__file__).parents[1] / "examples" / "chelsea.png")
    prepared = explainer.prepare(photo)
    out = explainer.engine.run(prepared.model_input[None], -np.arange(1, 11)[None],
                               thresholds={"conf_threshold": 0.5, "iou_threshold": 0.7})  # fmt: skip
    theirs = YOLO(plain, task="segment").predict(photo[:, :, ::-1].copy(), conf=0.5, iou=0.7, imgsz=SIZE,
                                                 verbose=False)[0]  # fmt: skip
    boxes, masks = theirs.boxes.xyxy.numpy(), theirs.masks.data.numpy() > 0.5  # [n, 320, 320] at the input
    input_boxes = out.boxes[0]
    assert (out.box_anchors[0] >= 0).sum() == 10 and len(boxes) >= 10
    whole = Prepared.as_input(prepared.model_input).placement  # (their masks are at the letterboxed input)
    for t in range(10):
        ours = instance_mask(out.instance_masks[0, t], input_boxes[t], whole)
        photo_box = prepared.placement.boxes_to_photo(input_boxes[t : t + 1])[0]
        match = [i for i in range(len(boxes)) if _same_box(photo_box, boxes[i])]
        assert match, photo_box
        overlap = [(ours & masks[i]).sum() / max((ours | masks[i]).sum(), 1) for i in match]
        assert max(overlap) > 0.999, (t, overlap)
