"""Files from other people's pipelines, explained as their own pipeline sees the photo.

The resize conventions (:mod:`onnxcam.geometry`) against independent references: PIL itself for its
filters, ultralytics' letterbox and ``scale_boxes``, torchvision's resize + centre crop and PaddleOCR's
``resize_norm_img`` written out here as their code computes them. What ``export --from`` reads from a file
(:mod:`onnxcam_export.sources`): ultralytics' metadata, Hugging Face's sidecars with optimum's all-symbolic
input, a timm ``pretrained_cfg``, Keras' ``preprocess_input`` presets, the label formats; each checked by the
model's prediction on a photo prepared by PIL or numpy here. The JavaScript consumers place photos and maps
as Python does. (The exporters themselves, where they import: ``test_ultralytics.py``, ``test_huggingface.py``.)
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from PIL import Image

from onnxcam.api import Explainer
from onnxcam.engine import Engine, softmax
from onnxcam.errors import OnnxcamError
from onnxcam.geometry import INTERPOLATIONS, Resize
from onnxcam.image import read_rgb
from onnxcam_export.from_onnx import Preprocessing, graft_file
from onnxcam_export.sources import labels_file
from tests.conftest import EXAMPLES, ROOT
from tests.test_cli import assert_clean_failure, run

torch = pytest.importorskip("torch")
nn = torch.nn
PHOTO = read_rgb(EXAMPLES / "chelsea.png")  # 451x300
VIEWS = {"3:2": PHOTO, "2:3": PHOTO.transpose(1, 0, 2), "2:1": PHOTO[37:263], "1:3": PHOTO[:, 200:300],
         "small": PHOTO[::5, ::5]}  # fmt: skip
PIL_FILTERS = {"pil-bilinear": Image.BILINEAR, "pil-bicubic": Image.BICUBIC, "pil-lanczos": Image.LANCZOS,
               "pil-nearest": Image.NEAREST}  # fmt: skip


def pil_resize(image: np.ndarray, size: tuple[int, int], resample: int) -> Image.Image:
    """PIL's resize with its horizontal pass first (one pass per call), the order of Pillow up to 12."""
    wide = Image.fromarray(image).resize((size[1], image.shape[0]), resample)
    return wide.resize((size[1], size[0]), resample)


def _views() -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(view) for name, view in VIEWS.items()}


@pytest.mark.parametrize("name", sorted(PIL_FILTERS))
def test_the_pil_filters_are_pils_own_to_the_grey_level(name: str) -> None:
    """PIL's taps and 22-bit fixed point, each pass rounded to 8 bits. onnxcam runs the horizontal pass first, as
    Pillow up to 12 always does; Pillow 13 runs the vertical one first when the height shrinks much more than the
    width, so PIL's result must be exactly one of the two orders."""
    from onnxcam import geometry

    kernel = {"pil-bilinear": (geometry._pil_bilinear, 1.0), "pil-bicubic": (geometry._pil_bicubic, 2.0),
              "pil-lanczos": (geometry._pil_lanczos, 3.0)}.get(name)  # fmt: skip
    for view in _views().values():
        for size in ((224, 224), (256, 341), (600, 37), (48, 192)):
            expected = np.asarray(Image.fromarray(view).resize((size[1], size[0]), PIL_FILTERS[name]))
            ours = INTERPOLATIONS[name](view, size)
            if kernel is None or np.array_equal(ours, expected):
                np.testing.assert_array_equal(ours, expected, err_msg=f"{name} {size}")
                continue
            rows = geometry._pil_pass(view, 0, geometry._pil_taps(view.shape[0], size[0], *kernel))
            swapped = geometry._pil_pass(rows, 1, geometry._pil_taps(view.shape[1], size[1], *kernel))
            np.testing.assert_array_equal(swapped, expected, err_msg=f"{name} {size}, vertical pass first")


def _ultralytics_letterbox(image: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    """ultralytics' ``LetterBox`` (auto=False, centred, grey 114) as its code computes it."""
    r = min(shape[0] / image.shape[0], shape[1] / image.shape[1])
    new_unpad = max(round(image.shape[1] * r), 1), max(round(image.shape[0] * r), 1)
    dw, dh = (shape[1] - new_unpad[0]) / 2, (shape[0] - new_unpad[1]) / 2
    if image.shape[1::-1] != new_unpad:
        image = cv2.resize(image, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    return cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114)), r


def _ultralytics_scale_boxes(input_shape: tuple, boxes: np.ndarray, photo_shape: tuple) -> np.ndarray:
    """ultralytics' ``scale_boxes`` (input pixels -> photo pixels) and ``clip_boxes``."""
    gain = min(input_shape[0] / photo_shape[0], input_shape[1] / photo_shape[1])
    new_h, new_w = (max(round(x * gain), 1) for x in photo_shape[:2])
    pad_x, pad_y = round((input_shape[1] - new_w) / 2 - 0.1), round((input_shape[0] - new_h) / 2 - 0.1)
    gain_x, gain_y = new_w / photo_shape[1], new_h / photo_shape[0]
    out = (boxes - [pad_x, pad_y, pad_x, pad_y]) / [gain_x, gain_y, gain_x, gain_y]
    return np.clip(out, 0, [photo_shape[1], photo_shape[0]] * 2)


@pytest.mark.parametrize("size", [(320, 320), (224, 288), (640, 480)])
def test_letterbox_and_its_boxes_are_ultralytics(size: tuple[int, int]) -> None:
    letterbox = Resize("letterbox", "linear", pad=114)
    rng = np.random.default_rng(0)
    for name, view in _views().items():
        ours, where = letterbox.apply(view, size)
        np.testing.assert_array_equal(ours, _ultralytics_letterbox(view, size)[0], err_msg=name)
        boxes = np.sort(rng.uniform(-20, max(size) + 20, (50, 2, 2)), axis=1).reshape(50, 4)[:, [0, 2, 1, 3]]
        np.testing.assert_allclose(where.boxes_to_photo(boxes), _ultralytics_scale_boxes(size, boxes, view.shape),
                                   rtol=1e-12, atol=1e-9, err_msg=name)  # fmt: skip


def test_a_centre_crop_is_torchvisions_and_hugging_faces() -> None:
    """torchvision: ``Resize(256)`` (shorter side, PIL) then ``CenterCrop(224)`` with ``round`` margins; HF's
    ``center_crop`` floors them (DeiT: the photo stretched to 256x256 first)."""
    for name, view in _views().items():
        h, w = view.shape[:2]
        short, long = sorted((h, w))
        scaled = (256, int(256 * long / short)) if h <= w else (int(256 * long / short), 256)
        pil = pil_resize(view, scaled, Image.BICUBIC)
        top, left = round((scaled[0] - 224) / 2), round((scaled[1] - 224) / 2)
        expected = np.asarray(pil.crop((left, top, left + 224, top + 224)))
        ours, where = Resize("crop", "pil-bicubic", shorter=256).apply(view, (224, 224))
        np.testing.assert_array_equal(ours, expected, err_msg=name)
        x0, _, _, y1 = where.seen  # the photo's part the model sees, in photo pixels
        assert abs(x0 - left * w / scaled[1]) <= 0.5 and abs(y1 - (top + 224) * h / scaled[0]) <= 0.5
        stretched = pil_resize(view, (256, 256), Image.BILINEAR)
        expected = np.asarray(stretched.crop((16, 16, 240, 240)))
        ours, _ = Resize("stretch-crop", "pil-bilinear", scaled=(256, 256), centre="floor").apply(view, (224, 224))
        np.testing.assert_array_equal(ours, expected, err_msg=name)


def test_ocr_padding_is_paddleocrs_resize_norm_img() -> None:
    for name, view in _views().items():
        ratio = view.shape[1] / view.shape[0]
        resized_w = 192 if math.ceil(48 * ratio) > 192 else math.ceil(48 * ratio)
        expected = np.full((48, 192, 3), 128, np.uint8)
        expected[:, :resized_w] = cv2.resize(view, (resized_w, 48))
        ours, where = Resize("pad", "linear", pad=128).apply(view, (48, 192))
        np.testing.assert_array_equal(ours, expected, err_msg=name)
        assert where.window == (0, 0, 48, resized_w)


def test_a_map_goes_back_to_the_photo_without_the_padding_and_empty_where_unseen() -> None:
    view = PHOTO  # 451x300 in 224x224: letterboxed to 224x149 at rows 37..185
    where = Resize("letterbox", "linear", pad=114).place(view.shape[:2], (224, 224))
    on_padding = np.zeros((224, 224), np.float32)
    on_padding[:37] = 1
    assert not where.map_to_photo(on_padding).any(), "the padding's values never reach the photo"
    spot = np.zeros((224, 224), np.float32)
    spot[100:110, 50:60] = 1  # input pixels -> photo pixels: (x - 0) / 0.4967, (y - 37) / 0.4967
    found = where.map_to_photo(spot)
    ys, xs = np.nonzero(found > 0.5)
    assert abs(xs.mean() - 55 / where.scale[1]) < 2 and abs(ys.mean() - (105 - 37) / where.scale[0]) < 2
    crop = Resize("crop", "pil-bilinear", shorter=256).place(view.shape[:2], (224, 224))
    photo_map = crop.map_to_photo(np.ones((224, 224), np.float32))
    x0, y0, x1, y1 = crop.seen
    assert photo_map[y0:y1, x0:x1].min() == 1 and photo_map.sum() == (x1 - x0) * (y1 - y0)


class TinyClassifier(nn.Module):
    """Four stride-2 convolutions (a 7x7 grid at 112x112), a pool and a linear head; input NCHW."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        layers = []
        for c_in, c_out in ((3, 8), (8, 16), (16, 16), (16, 24)):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class FlatClassifier(TinyClassifier):
    """Its head reads the flattened 3x12 grid of a 48x192 input: it runs at no other size."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(24 * 3 * 12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def tiny_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyClassifier()
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 112, 112))
        model.head.weight.mul_(4)  # spread-out probabilities
    return model.eval()


def export(model: nn.Module, path: Path, shape: tuple[int, ...] = (1, 3, 112, 112), axes: dict | None = None) -> Path:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(*shape),), path, input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    return path


def _torch_probabilities(model: nn.Module, pixels: np.ndarray) -> np.ndarray:
    """The model's softmax on float ``[H, W, 3]`` pixels as its pipeline hands them over (already normalised)."""
    with torch.no_grad():
        logits = model.double()(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None])[0]
    model.float()
    return softmax(logits.numpy())


def test_hugging_face_sidecars_and_optimums_symbolic_input_graft_with_no_flag(tmp_path: Path) -> None:
    """optimum's layout: every input axis symbolic, ``config.json`` and ``preprocessor_config.json`` beside the
    file (here DeiT's processor: stretch to 128x128, crop 112x112, bicubic, mean/std 0.5)."""
    model = tiny_classifier()
    axes = {"pixel_values": {0: "batch_size", 1: "num_channels", 2: "height", 3: "width"}}
    source = export(model, tmp_path / "model.onnx", axes=axes)
    labels = [f"kind {i}" for i in range(6)]
    (tmp_path / "config.json").write_text(json.dumps({"id2label": dict(enumerate(labels))}))
    processor = {"image_processor_type": "DeiTImageProcessor", "do_resize": True, "resample": 3, "do_center_crop": True,
                 "size": {"height": 128, "width": 128}, "crop_size": {"height": 112, "width": 112}, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3}  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    result = run("export", "--from", str(source))
    assert result.returncode == 0, result.stderr
    assert (
        "labels: sidecar config.json" in result.stdout and "resize: sidecar preprocessor_config.json" in result.stdout
    )
    assert "its channel axis is symbolic" in result.stdout and "warning" not in result.stderr
    explainer = Explainer(tmp_path / "model.cam.onnx")
    assert list(explainer.labels) == labels and explainer.card.input_size == (112, 112)
    for name, view in _views().items():
        pil = np.asarray(pil_resize(view, (128, 128), Image.BICUBIC).crop((8, 8, 120, 120)))
        expected = _torch_probabilities(model, (pil / 255 - 0.5) / 0.5)
        found = explainer.explain(view).predictions
        assert [p.index for p in found] == list(np.argsort(-expected)[:5]), name
        np.testing.assert_allclose([p.probability for p in found], np.sort(expected)[::-1][:5], atol=1e-5)


def test_a_timm_pretrained_cfg_is_its_eval_transform(tmp_path: Path) -> None:
    """``Resize(floor(112 / 0.9))`` on the shorter side, ``CenterCrop(112)``, bicubic, the cfg's mean/std."""
    model = tiny_classifier(seed=1)
    source = export(model, tmp_path / "timm.onnx", axes={"pixel_values": {0: "N"}})
    cfg = {"input_size": [3, 112, 112], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225], "crop_pct": 0.9, "crop_mode": "center", "num_classes": 6}  # fmt: skip
    (tmp_path / "pretrained_cfg.json").write_text(json.dumps(cfg))
    card, _ = graft_file(
        source, tmp_path / "timm.cam.onnx", prep=Preprocessing.from_json(tmp_path / "pretrained_cfg.json")
    )
    assert card["resize"] == {"mode": "crop", "interpolation": "pil-bicubic", "shorter": 124}
    explainer = Explainer(tmp_path / "timm.cam.onnx")
    for name, view in _views().items():
        h, w = view.shape[:2]
        scaled = (124, int(124 * w / h)) if h <= w else (int(124 * h / w), 124)
        top, left = round((scaled[0] - 112) / 2), round((scaled[1] - 112) / 2)
        pil = pil_resize(view, scaled, Image.BICUBIC).crop((left, top, left + 112, top + 112))
        expected = _torch_probabilities(model, (np.asarray(pil) / 255 - cfg["mean"]) / cfg["std"])
        found = explainer.explain(view).predictions
        assert [p.index for p in found] == list(np.argsort(-expected)[:5]), name
        np.testing.assert_allclose([p.probability for p in found], np.sort(expected)[::-1][:5], atol=1e-5)


def test_a_centre_crops_margins_are_empty_and_the_record_says_what_the_model_saw(tmp_path: Path) -> None:
    source = export(tiny_classifier(seed=7), tmp_path / "crop.onnx", axes={"pixel_values": {0: "N"}})
    assert run("export", "--from", str(source), "--mean", "0", "0", "0", "--std", "1", "1", "1", "--resize", "crop",
               "--labels", str(_labels(tmp_path))).returncode == 0  # fmt: skip
    result = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(tmp_path / "crop.cam.onnx"), "--out",
                 str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    where = Resize("crop", "pil-bilinear", shorter=128).place((300, 451), (112, 112))  # floor(112 / 0.875) = 128
    assert record["seen"] == list(where.seen) and record["seen"][0] > 0 and record["seen"][3] < 300
    cam = np.load(record["map"])
    x0, y0, x1, y1 = record["seen"]
    assert cam.shape == (300, 451) and cam[y0:y1, x0:x1].max() == pytest.approx(1, abs=1e-6)
    assert not cam[:, :x0].any() and not cam[:, x1:].any() and not cam[:y0].any() and not cam[y1:].any()


def _labels(folder: Path) -> Path:
    (folder / "labels.txt").write_text("\n".join(f"kind {i}" for i in range(6)))
    return folder / "labels.txt"


def test_the_keras_caffe_preset_is_preprocess_input(tmp_path: Path) -> None:
    """Keras' ``preprocess_input(mode="caffe")``: RGB -> BGR, minus the ImageNet mean on 0..255; the photo as
    ``keras.utils.load_img(target_size=...)`` resizes it (PIL's NEAREST)."""
    model = tiny_classifier(seed=2)
    source = export(model, tmp_path / "keras.onnx", axes={"pixel_values": {0: "N"}})
    card, _ = graft_file(
        source, tmp_path / "keras.cam.onnx", prep=Preprocessing.create(None, None, None, False, "caffe")
    )
    assert card["sources"]["mean"] == "preset caffe" and card["resize"]["interpolation"] == "pil-nearest"
    explainer = Explainer(tmp_path / "keras.cam.onnx")
    loaded = np.asarray(Image.fromarray(PHOTO).resize((112, 112), Image.NEAREST), np.float64)
    expected = _torch_probabilities(model, loaded[:, :, ::-1] - [103.939, 116.779, 123.68])
    found = explainer.explain(PHOTO).predictions
    np.testing.assert_allclose([p.probability for p in found], np.sort(expected)[::-1][:5], atol=1e-4)


def test_ultralytics_metadata_gives_labels_letterbox_and_boxes_in_photo_pixels(tmp_path: Path) -> None:
    """A file with ultralytics' metadata layout (``names``, ``imgsz``, ``task``, ``author``), grafted with no flag:
    the model sees the letterboxed photo at pixels / 255 and the boxes come back as ``scale_boxes`` puts them."""
    from tests.test_detect import TinyDetector

    torch.manual_seed(0)
    detector = TinyDetector(classes=3, size=64).eval()
    source = tmp_path / "best.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(detector, (torch.zeros(1, 3, 64, 64),), source, input_names=["images"],
                          output_names=["output0"], opset_version=17, dynamo=False)  # fmt: skip
    model = onnx.load(source)
    meta = {"author": "Ultralytics", "task": "detect", "stride": "8", "imgsz": "[64, 64]", "batch": "1",
            "names": "{0: 'circle', 1: 'square', 2: 'triangle'}"}  # fmt: skip
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, source)
    result = run("export", "--from", str(source))
    assert result.returncode == 0, result.stderr
    assert not result.stderr, "nothing is assumed: the metadata names it all"
    explainer = Explainer(tmp_path / "best.cam.onnx")
    assert explainer.labels == ("circle", "square", "triangle") and explainer.card.resizing.mode == "letterbox"
    for name, view in _views().items():
        boxed, _ = _ultralytics_letterbox(view, (64, 64))
        out = Engine(tmp_path / "best.cam.onnx").run(boxed[None], np.array([[-1, -2, -3]]),
                                                     thresholds={"conf_threshold": 0.0})  # fmt: skip
        found = explainer.explain(view, top_k=3, conf=0.0).maps
        expected = _ultralytics_scale_boxes((64, 64), out.boxes[0].astype(np.float64), view.shape)
        np.testing.assert_allclose([m.box for m in found], np.round(expected, 2), atol=0.011, err_msg=name)
        assert [m.index for m in found] == list(out.target_classes[0]), name


def test_a_text_line_model_takes_height_and_width_and_pads_on_the_right(tmp_path: Path) -> None:
    """PaddleOCR's text-line classifier layout: 48x192, height fixed, width dynamic in the file."""
    model = tiny_classifier(seed=3)
    source = export(model, tmp_path / "cls.onnx", (1, 3, 48, 192), axes={"pixel_values": {0: "N", 3: "W"}})
    result = run("export", "--from", str(source), "--size", "48", "192", "--resize", "pad", "--mean", "0.5", "0.5",
                 "0.5", "--std", "0.5", "0.5", "0.5")  # fmt: skip
    assert result.returncode == 0, result.stderr
    explainer = Explainer(tmp_path / "cls.cam.onnx")
    assert explainer.card.input_size == (48, 192) and explainer.card.resizing.pad == 128
    line = np.ascontiguousarray(PHOTO[100:160])  # a 451x60 strip: 48x361 would not fit, 192 wide instead
    explanation = explainer.explain(line)
    assert explanation.maps[0].cam.shape == line.shape[:2]
    for spelled in (["--size", "48x192"], ["--size", "48,192"], ["--size=48x192"]):
        again = run("export", "--from", str(source), "--out", str(tmp_path / "again.onnx"), *spelled, "--mean", "0.5",
                    "0.5", "0.5", "--std", "0.5", "0.5", "0.5", "--resize", "pad")  # fmt: skip
        assert again.returncode == 0, (spelled, again.stderr)
        assert Engine(tmp_path / "again.onnx").card.input_size == (48, 192)
    assert_clean_failure(run("export", "--from", str(source), "--size", "40"), "40x40", "contradicts", "48x?")
    flat = export(FlatClassifier().eval(), tmp_path / "flat.onnx", (1, 3, 48, 192), {"pixel_values": {0: "N", 3: "W"}})
    assert_clean_failure(run("export", "--from", str(flat), "--size", "48", "--resize", "pad"),
                         "cannot run the model at the input size 48x48", "--size H W")  # fmt: skip
    assert_clean_failure(run("export", "--from", str(source), "--size", "forty"), "--size 'forty' is not a size")
    assert_clean_failure(run("export", "--from", str(source), "--size", "48", "192", "--resize", "squash"),
                         "unknown --resize 'squash'", "letterbox")  # fmt: skip


def test_a_fixed_batch_other_than_one_explains_any_number_of_photos(tmp_path: Path) -> None:
    model = tiny_classifier(seed=4)
    fixed = export(model, tmp_path / "fixed.onnx", (2, 3, 112, 112))
    dynamic = export(model, tmp_path / "dynamic.onnx", axes={"pixel_values": {0: "N"}})
    unit = Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False)
    for path in (fixed, dynamic):
        graft_file(path, path.with_suffix(".cam.onnx"), prep=unit)
    assert Engine(fixed.with_suffix(".cam.onnx")).fixed_batch == 2
    photos = [PHOTO, PHOTO[::-1], PHOTO[:, ::-1]]
    for count in (1, 3):
        ours = Explainer(fixed.with_suffix(".cam.onnx")).explain_batch(photos[:count], top_k=2)
        reference = Explainer(dynamic.with_suffix(".cam.onnx")).explain_batch(photos[:count], top_k=2)
        for a, b in zip(ours, reference, strict=True):
            assert [m.index for m in a.maps] == [m.index for m in b.maps]
            np.testing.assert_allclose([m.probability for m in a.maps], [m.probability for m in b.maps], atol=1e-6)
            np.testing.assert_allclose(a.maps[0].cam, b.maps[0].cam, atol=1e-5)


def test_a_grid_under_3x3_is_a_warning_naming_a_better_size(tmp_path: Path) -> None:
    source = export(tiny_classifier(seed=5), tmp_path / "small.onnx", (1, 3, 32, 32), axes={"pixel_values": {0: "N"}})
    result = run(
        "export", "--from", str(source), "--mean", "0", "0", "0", "--std", "1", "1", "1", "--resize", "stretch"
    )
    assert result.returncode == 0, result.stderr
    assert "grid is 2x2" in result.stderr and "an input of 112x112 gives a 7x7 grid" in result.stderr


def test_what_is_assumed_is_a_warning_at_export_and_in_the_explanations_json(tmp_path: Path) -> None:
    source = export(tiny_classifier(seed=6), tmp_path / "bare.onnx")
    result = run("export", "--from", str(source))
    assert result.returncode == 0, result.stderr
    assert "warning: nothing names the mean, std, bgr, resize" in result.stderr
    assert "mean: assumed" in result.stdout
    explained = run("explain", str(EXAMPLES / "chelsea.png"), "--model", str(tmp_path / "bare.cam.onnx"), "--json",
                    "--out", str(tmp_path / "out"))  # fmt: skip
    assert explained.returncode == 0, explained.stderr
    assert "assumed" not in explained.stderr, "said once on the terminal, at export"
    assert any("were assumed at export" in w for w in json.loads(explained.stdout)["warnings"])


def test_labels_come_from_every_format_users_have(tmp_path: Path) -> None:
    names = ["person", "bicycle", "car"]
    files = {
        "labels.txt": "\n".join(names) + "\n",
        "labels.json": json.dumps(names),
        "map.json": json.dumps({"2": "car", "0": "person", "1": "bicycle"}),
        "config.json": json.dumps({"id2label": {"0": "person", "1": "bicycle", "2": "car"}, "model_type": "vit"}),
    }
    try:
        import yaml  # noqa: F401

        files["coco.yaml"] = "path: ../datasets\nnames:\n  0: person\n  1: bicycle\n  2: car\n"
    except ImportError:
        pass
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert labels_file(tmp_path / name) == names, name
    (tmp_path / "gap.json").write_text(json.dumps({"0": "a", "2": "c"}))
    with pytest.raises(OnnxcamError, match="from 0 to 1 without gaps"):
        labels_file(tmp_path / "gap.json")


NODE = shutil.which("node")
PROBE = """
import { readFileSync, writeFileSync } from "node:fs";
import { mapToPhoto, modelInput } from "%s";
const [height, width, size, resize, out] = JSON.parse(process.argv[2]);
const rgb = new Uint8Array(readFileSync(out + ".rgb"));
const { pixels, placement } = modelInput(rgb, height, width, size, resize);
const grid = (i) => ((i %% size[1]) * 7 + Math.floor(i / size[1]) * 3) %% 101 / 100;
const map = Float32Array.from({ length: size[0] * size[1] }, (_, i) => grid(i));
writeFileSync(out, Buffer.concat([Buffer.from(pixels), Buffer.from(mapToPhoto(map, placement).buffer)]));
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.parametrize("resize", [Resize("letterbox", "linear", pad=114), Resize("crop", "pil-bicubic", shorter=128),
                                    Resize("pad", "linear", pad=128), Resize("stretch-crop", "pil-bilinear",
                                    scaled=(128, 128), centre="floor")], ids=lambda r: r.mode)  # fmt: skip
def test_the_browser_and_node_place_photos_and_maps_as_python(resize: Resize, tmp_path: Path) -> None:
    """``onnxcam.mjs`` (the page's and the Node script's) against :mod:`onnxcam.geometry` on non-square photos:
    the model's input (PIL's filters to the grey level, OpenCV's within one) and a map taken back to the photo."""
    from onnxcam import maps

    probe = tmp_path / "probe.mjs"
    probe.write_text(PROBE % (ROOT / "onnxcam" / "site" / "onnxcam.mjs").as_uri())
    size = (48, 192) if resize.mode == "pad" else (112, 112)
    for name, view in _views().items():
        (tmp_path / "out.rgb").write_bytes(view.tobytes())
        args = json.dumps([*view.shape[:2], size, resize.to_card(), str(tmp_path / "out")])
        subprocess.run([NODE, str(probe), args], check=True, timeout=120)
        raw = (tmp_path / "out").read_bytes()
        pixels = np.frombuffer(raw[: size[0] * size[1] * 3], np.uint8).reshape(*size, 3)
        js_map = np.frombuffer(raw[size[0] * size[1] * 3 :], np.float32).reshape(view.shape[:2])
        ours, where = resize.apply(view, size)
        exact = resize.interpolation.startswith("pil-")
        assert np.abs(pixels.astype(int) - ours).max() <= (0 if exact else 1), name
        i = np.arange(size[0] * size[1])
        grid = (((i % size[1]) * 7 + (i // size[1]) * 3) % 101 / 100).astype(np.float32).reshape(size)
        full = where.map_to_photo(grid)
        x0, y0, x1, y1 = where.seen
        maps.normalize(full[y0:y1, x0:x1])
        np.testing.assert_allclose(js_map, full, atol=1e-5, err_msg=name)
