"""What a model file says about the pipeline it was deployed in, and where each fact came from.

``export --from`` explains a model as its own pipeline sees the photo, so it reads labels, input size,
normalisation, channel order and resize convention (:class:`onnxcam.geometry.Resize`) before it assumes
anything. In order of precedence: the command line's flags, the file's own metadata (:data:`METADATA`),
the sidecar files its ecosystem writes beside it (:data:`SIDECARS`), then onnxcam's defaults, each of
which is reported as assumed. Every reader returns a :class:`Facts` with the source it read.

Presets (``--preprocess NAME``) are the pipelines that no file records: Keras' ``preprocess_input`` modes
(found by themselves where tf2onnx's node names name a Keras application: :func:`keras_application`).
A ``--preprocess FILE`` may be onnxcam's own JSON, a timm ``pretrained_cfg`` or a Hugging Face
``preprocessor_config.json``; ``--labels FILE`` one name per line, a JSON list, a JSON ``{index: name}``
map, a Hugging Face ``config.json`` or an ultralytics data YAML.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxcam.contract import IMAGENET_MEAN, IMAGENET_STD
from onnxcam.errors import OnnxcamError
from onnxcam.geometry import STRETCH, Resize
from onnxcam.inputs import read_small_text

# family: what the exporter calls the model; keypoints: a pose model's values per anchor (ultralytics' kpt_shape)
FACTS = ("labels", "size", "mean", "std", "bgr", "resize", "family", "keypoints")
DEFAULTS: dict[str, object] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "bgr": False, "resize": STRETCH}
ASSUMED = {
    "mean": "ImageNet's mean (0.485, 0.456, 0.406)",
    "std": "ImageNet's std (0.229, 0.224, 0.225)",
    "bgr": "RGB channels",
    "resize": "a plain stretch of the whole photo to the input",
}


@dataclass
class Facts:
    """Facts (a subset of :data:`FACTS`) and, per fact, where it was found."""

    values: dict[str, object] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def add(self, source: str, **facts: object) -> Facts:
        """Take each fact not known yet (None: not known here either) from ``source``."""
        for key, value in facts.items():
            if value is not None and key not in self.values:
                self.values[key] = value
                self.sources[key] = source
        return self

    def merge(self, other: Facts) -> Facts:
        for key, value in other.values.items():
            self.add(other.sources[key], **{key: value})
        return self


def _triple(values: object, where: str) -> tuple[float, float, float]:
    if not isinstance(values, list | tuple) or len(values) != 3:
        raise OnnxcamError(f"{where} must be three numbers (R, G, B), got {values!r}")
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise OnnxcamError(f"{where} must be three numbers (R, G, B), got {values!r}") from None
    if not all(math.isfinite(v) for v in numbers):
        raise OnnxcamError(f"{where} must be finite, got {values!r}")
    return numbers  # type: ignore[return-value]


def _size(value: object, where: str) -> tuple[int, int]:
    sides = [value, value] if isinstance(value, int) else value
    if not isinstance(sides, list | tuple) or len(sides) != 2 or not all(type(v) is int and v >= 1 for v in sides):
        raise OnnxcamError(f"{where} must be a size (an integer, or height and width), got {value!r}")
    return int(sides[0]), int(sides[1])


def _names(value: object, where: str) -> list[str]:
    """Class names from a list, or from an ``{index: name}`` map whose keys are 0 .. K-1."""
    if isinstance(value, dict):
        try:
            indexed = {int(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            raise OnnxcamError(f"{where}: class indices must be integers, got {sorted(value)[:5]}") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise OnnxcamError(f"{where}: class indices must run from 0 to {len(indexed) - 1} without gaps")
        value = [indexed[i] for i in range(len(indexed))]
    if not isinstance(value, list) or not value or not all(isinstance(v, str | int | float) for v in value):
        raise OnnxcamError(f"{where}: expected a list of class names or an {{index: name}} map")
    return [str(v).strip() for v in value]


# --- the file's own metadata ------------------------------------------------------------------------------------


def _ultralytics(meta: dict[str, str]) -> Facts | None:
    """An ultralytics export: ``names``, ``imgsz``, ``task`` in its metadata; pixels / 255, RGB, and its predictor's
    resize: ``LetterBox`` (grey 114, INTER_LINEAR) for detect/segment/pose/obb, PIL's bilinear shorter side and a
    centre crop for classify (``classify_transforms``)."""
    maker = (meta.get("author", "") + meta.get("docs", "")).lower()
    if not {"names", "imgsz"} <= set(meta) or "ultralytics" not in maker:
        return None
    where = "file metadata (ultralytics)"
    try:
        names = ast.literal_eval(meta["names"])
        size = ast.literal_eval(meta["imgsz"])
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise OnnxcamError(f"the ultralytics metadata is malformed: names {meta['names'][:40]!r}, imgsz "
                           f"{meta['imgsz'][:40]!r}; re-export the model with ultralytics") from None  # fmt: skip
    height, width = _size(size, "the ultralytics metadata's imgsz")
    task = meta.get("task", "detect")
    resize = (Resize("crop", "pil-bilinear", shorter=min(height, width)) if task == "classify"
              else Resize("letterbox", "linear", pad=114))  # fmt: skip
    keypoints = None
    if task == "pose":
        try:
            shape = ast.literal_eval(meta.get("kpt_shape", ""))
            if len(shape) != 2 or not all(type(d) is int and d > 0 for d in shape):
                raise ValueError(shape)
            keypoints = math.prod(shape)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise OnnxcamError(f"the ultralytics pose metadata's kpt_shape {meta.get('kpt_shape', '')[:40]!r} is not "
                               "[keypoints, values]; re-export the model with ultralytics") from None  # fmt: skip
    return Facts().add(where, labels=_names(names, "the ultralytics metadata's names"), size=(height, width),
                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), bgr=False, resize=resize,
                       family=f"ultralytics-{task}", keypoints=keypoints)  # fmt: skip


METADATA: dict[str, Callable[[dict[str, str]], Facts | None]] = {"ultralytics": _ultralytics}


# --- Hugging Face's sidecars --------------------------------------------------------------------------------------

PIL_RESAMPLE = {0: "pil-nearest", 1: "pil-lanczos", 2: "pil-bilinear", 3: "pil-bicubic"}  # PIL.Image.Resampling


def _read_json(path: Path) -> object:
    try:
        return json.loads(read_small_text(path))
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise OnnxcamError(f"{path} is not valid JSON ({str(exc)[:80]}); give the file the exporter wrote") from None


def hf_config(path: Path) -> Facts:
    """``config.json``: the class names of ``id2label``, and the ``model_type`` (which detector layout it has); a
    model with no classes (optimum's CLIP export: its labels are the prompts) has the model type alone."""
    data = _read_json(path)
    family = data.get("model_type") if isinstance(data, dict) and isinstance(data.get("model_type"), str) else None
    if not isinstance(data, dict) or ("id2label" not in data and family is None):
        raise OnnxcamError(f"{path} has no id2label and no model_type: it is not a Hugging Face model config")
    if "id2label" not in data:
        return Facts().add(f"sidecar {path.name}", family=family)
    return Facts().add(f"sidecar {path.name}", labels=_names(data["id2label"], f"{path} id2label"), family=family)


def _hf_resize(data: dict, where: str) -> tuple[tuple[int, int] | None, Resize]:
    """The input size and resize convention of an image processor's settings."""
    resample = data.get("resample", 2)
    if resample not in PIL_RESAMPLE:
        raise OnnxcamError(f"{where}: resample {resample!r} is not one onnxcam reproduces "
                           f"({', '.join(f'{k} {v}' for k, v in PIL_RESAMPLE.items())})")  # fmt: skip
    how = PIL_RESAMPLE[resample]
    size, crop = data.get("size"), data.get("crop_size")
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) and {"height", "width"} <= set(crop) else crop
    if isinstance(crop, int):
        crop = (crop, crop)
    if not data.get("do_resize", True):
        raise OnnxcamError(f"{where}: do_resize is false, so the model takes photos at their own size; onnxcam needs "
                           "a fixed input: give --size")  # fmt: skip
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if not isinstance(size, dict):
        raise OnnxcamError(f"{where}: size {size!r} is not one onnxcam reads (height and width, or shortest_edge)")
    if "crop_pct" in data and "shortest_edge" in size and not data.get("do_center_crop"):  # ConvNextImageProcessor
        edge = _size(size["shortest_edge"], f"{where} size")[0]
        if edge >= 384:
            return (edge, edge), Resize("stretch", how)
        return (edge, edge), Resize("crop", how, shorter=int(edge / data["crop_pct"]), centre="floor")
    if {"height", "width"} <= set(size):
        scaled = _size([size["height"], size["width"]], f"{where} size")
        if data.get("do_center_crop") and crop and tuple(crop) != scaled:
            return _size(list(crop), f"{where} crop_size"), Resize("stretch-crop", how, scaled=scaled, centre="floor")
        return scaled, Resize("stretch", how)
    if set(size) == {"shortest_edge"}:
        if not (data.get("do_center_crop") and crop):
            raise OnnxcamError(f"{where}: the shorter side is resized to {size['shortest_edge']} and the longer one "
                               "follows the photo's aspect, so the input size varies; give --size")  # fmt: skip
        shorter = _size(size["shortest_edge"], f"{where} size")[0]
        return _size(list(crop), f"{where} crop_size"), Resize("crop", how, shorter=shorter, centre="floor")
    raise OnnxcamError(f"{where}: size {size} (a longest edge: the input size varies with the photo) is not a "
                       "fixed input; give --size")  # fmt: skip


def hf_preprocessor(path: Path, data: dict | None = None) -> Facts:
    """``preprocessor_config.json``: size, crop, resample, rescale, normalisation and channel order."""
    data = _read_json(path) if data is None else data
    where = str(path)
    if not isinstance(data, dict) or not {"image_mean", "do_normalize", "size", "do_resize"} & set(data):
        raise OnnxcamError(f"{path} is not a Hugging Face image processor's settings (no size, image_mean, ...)")
    size, resize = _hf_resize(data, where)
    factor = float(data.get("rescale_factor", 1 / 255)) if data.get("do_rescale", True) else 1.0
    normalize = data.get("do_normalize", True)
    mean = _triple(data.get("image_mean", [0, 0, 0]), f"{where} image_mean") if normalize else (0.0, 0.0, 0.0)
    std = _triple(data.get("image_std", [1, 1, 1]), f"{where} image_std") if normalize else (1.0, 1.0, 1.0)
    if not factor > 0 or min(std) <= 0:
        raise OnnxcamError(f"{where}: rescale_factor and image_std must be positive")
    unit = 255 * factor  # the model sees (pixel * factor - m) / s = (pixel / 255 - m / unit) / (s / unit)
    source = f"sidecar {path.name}"
    return Facts().add(source, size=size, mean=tuple(m / unit for m in mean), std=tuple(s / unit for s in std),
                       bgr=bool(data.get("do_flip_channel_order", False)), resize=resize)  # fmt: skip


SIDECARS: dict[str, Callable[[Path], Facts]] = {"config.json": hf_config, "preprocessor_config.json": hf_preprocessor}


# --- presets and --preprocess files -------------------------------------------------------------------------------

# Keras applications' preprocess_input modes, on the photo as keras.utils.load_img resizes it (PIL NEAREST)
PRESETS: dict[str, dict[str, object]] = {
    "caffe": {"mean": (123.68 / 255, 116.779 / 255, 103.939 / 255), "std": (1 / 255,) * 3, "bgr": True},
    "tf": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "bgr": False},
    "torch": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "bgr": False},
}
KERAS_RESIZE = Resize("stretch", "pil-nearest")
KERAS_APPLICATIONS = {  # a Keras application's model name (tf2onnx prefixes its node names with it) -> its mode
    "caffe": r"vgg1[69]|resnet(50|101|152)",
    "tf": r"resnet(50|101|152)v2|xception|inception_v3|inception_resnet_v2|mobilenet(v2)?(_[\d.]+_\d+)?|nasnet\w*",
    "torch": r"densenet(121|169|201)",
}
TIMM_INTERPOLATION = {"bilinear": "pil-bilinear", "bicubic": "pil-bicubic", "nearest": "pil-nearest",
                      "lanczos": "pil-lanczos"}  # fmt: skip


# --resize NAME: a convention by name, for an input of (height, width)
RESIZES: dict[str, Callable[[tuple[int, int]], Resize]] = {
    "stretch": lambda size: STRETCH,
    "letterbox": lambda size: Resize("letterbox", "linear", pad=114),  # ultralytics
    "crop": lambda size: Resize("crop", "pil-bilinear", shorter=math.floor(min(size) / 0.875)),  # torchvision eval
    "pad": lambda size: Resize("pad", "linear", pad=128),  # PaddleOCR's recogniser and text-line classifier
}


def preset(name: str) -> Facts:
    return Facts().add(f"preset {name}", **PRESETS[name], resize=KERAS_RESIZE)


def _timm(data: dict, where: str) -> Facts:
    """timm's ``pretrained_cfg``: ``Resize(floor(size / crop_pct))`` (the shorter side) + ``CenterCrop(size)``."""
    _, height, width = data["input_size"]
    crop_pct = float(data.get("crop_pct", 0.875))
    how = TIMM_INTERPOLATION.get(data.get("interpolation", "bilinear"))
    if how is None or data.get("crop_mode", "center") != "center" or not 0 < crop_pct <= 1:
        raise OnnxcamError(f"{where}: interpolation {data.get('interpolation')!r}, crop_mode "
                           f"{data.get('crop_mode')!r}, crop_pct {crop_pct} is not a timm eval transform onnxcam "
                           "reproduces (bilinear/bicubic, center, 0 < crop_pct <= 1)")  # fmt: skip
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    resize = (Resize("crop", how, shorter=scaled[0]) if scaled[0] == scaled[1]
              else Resize("stretch-crop", how, scaled=scaled))  # fmt: skip
    mean = _triple(data.get("mean", IMAGENET_MEAN), f"{where} mean")
    std = _triple(data.get("std", IMAGENET_STD), f"{where} std")
    source = f"timm pretrained_cfg {Path(where).name}"
    return Facts().add(source, size=(int(height), int(width)), mean=mean, std=std, bgr=False, resize=resize)


OWN_KEYS = {"size", "mean", "std", "bgr", "resize"}


def _own(data: dict, where: str) -> Facts:
    """onnxcam's own ``{"size", "mean", "std", "bgr", "resize"}``."""
    unknown = set(data) - OWN_KEYS
    if unknown:
        raise OnnxcamError(f"{where}: unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(OWN_KEYS))}, or a "
                           "timm pretrained_cfg, or a Hugging Face preprocessor_config.json")  # fmt: skip
    values = {
        "size": _size(data["size"], f"{where} size") if "size" in data else None,
        "mean": _triple(data["mean"], f"{where} mean") if "mean" in data else None,
        "std": _triple(data["std"], f"{where} std") if "std" in data else None,
        "bgr": bool(data["bgr"]) if "bgr" in data else None,
        "resize": Resize.from_card(data["resize"]) if "resize" in data else None,
    }
    return Facts().add(f"--preprocess {Path(where).name}", **values)


def preprocess_file(spec: str) -> Facts:
    """``--preprocess``: a preset name, or a JSON file (onnxcam's own, timm's pretrained_cfg or HF's processor)."""
    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if not path.exists() and "/" not in spec and not spec.endswith(".json"):
        raise OnnxcamError(f"--preprocess {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise OnnxcamError(f"{path}: expected a JSON object")
    if "input_size" in data:
        return _timm(data, str(path))
    if {"image_mean", "do_normalize", "do_resize", "image_processor_type"} & set(data):
        return hf_preprocessor(path, data)
    return _own(data, str(path))


def labels_file(path: Path) -> list[str]:
    """``--labels``: one name per line, a JSON list or ``{index: name}`` map, HF's config.json (``id2label``), or
    an ultralytics data YAML (``names``)."""
    text = read_small_text(path)
    stripped = text.lstrip()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise OnnxcamError(
                f"reading {path} needs PyYAML (pip install pyyaml), or give the names one per line"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise OnnxcamError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        return _names(data.get("names") if isinstance(data, dict) else data, str(path))
    if stripped[:1] in ("[", "{"):
        data = _read_json(path)
        if isinstance(data, dict) and "id2label" in data:
            data = data["id2label"]
        elif isinstance(data, dict) and "names" in data:
            data = data["names"]
        return _names(data, str(path))
    # (surrounding whitespace is dropped, but a line of whitespace alone is kept: a recogniser's space character)
    return [line.strip() or line for line in text.splitlines() if line]


def from_file(model: onnx.ModelProto, source: Path) -> Facts:
    """What the model file and the sidecars beside it say (metadata first)."""
    meta = {p.key: p.value for p in model.metadata_props}
    facts = Facts()
    for read in METADATA.values():
        found = read(meta)
        if found is not None:
            facts.merge(found)
    for name, read in SIDECARS.items():
        path = source.parent / name
        if path.is_file():
            facts.merge(read(path))
    found = keras_application(model)
    if found is not None:
        name, mode = found
        facts.merge(Facts().add(f"Keras application {name!r} (preprocess_input mode {mode})", **PRESETS[mode],
                                resize=KERAS_RESIZE))  # fmt: skip
    return facts


def keras_application(model: onnx.ModelProto) -> tuple[str, str] | None:
    """(model name, preprocess_input mode) of a Keras application converted by tf2onnx, which names every node
    ``<model name>_<n>/<layer>/...``; None for anything else."""
    if model.producer_name != "tf2onnx":
        return None
    prefixes = Counter(n.name.split("/")[0] for n in model.graph.node if "/" in n.name)
    if not prefixes:
        return None
    name = re.sub(r"_\d+$", "", prefixes.most_common(1)[0][0])
    mode = next((m for m, pattern in KERAS_APPLICATIONS.items() if re.fullmatch(pattern, name)), None)
    return None if mode is None else (name, mode)
