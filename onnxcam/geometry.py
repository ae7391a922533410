"""How a photo becomes the model's input, and how maps and boxes go back to the photo's pixels.

A deployed pipeline resizes its photos one way, and a model sees (and explains) only that view.
The ways in use are data here (:data:`MODES`), the model card names one (:class:`Resize`), and
every consumer (this file, the browser page and the Node script's ``onnxcam.mjs``) does the same:

``stretch``    the whole photo to the input size, aspect not kept (Keras examples, HF's
               ``{"height", "width"}`` processors).
``letterbox``  aspect kept, the longer side fills the input, centred on ``pad``-grey borders
               (ultralytics' ``LetterBox``: ``round(d - 0.1)`` before, ``round(d + 0.1)`` after).
``crop``       the shorter side to ``shorter`` pixels, aspect kept, then the input's size cut from
               the centre (torchvision/timm eval transforms, ``crop_pct``; HF's ``shortest_edge`` +
               ``crop_size``): the photo's margins are not seen, and their map is empty.
``stretch-crop`` the photo stretched to ``scaled`` (height, width), then the input's size cut from the
               centre (Hugging Face's DeiT: 256x256, then 224x224).
``pad``        the height to the input's, the width by the aspect (at most the input's), ``pad`` on the
               right (OCR recognisers and text-line classifiers, as PaddleOCR's ``resize_norm_img``).

Interpolations (:data:`INTERPOLATIONS`): OpenCV's, and PIL's antialiased filters reproduced exactly
(``pil-bilinear``, ``pil-bicubic``: the resampling of torchvision's and Hugging Face's PIL transforms).
Arrays are RGB ``[H, W, 3]`` uint8; sizes are ``(height, width)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from onnxcam.errors import OnnxcamError
from onnxcam.image import resize_rgb

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class Placement:
    """Where the resized photo lies in the model's input: ``resized`` is the photo's size after resizing,
    ``offset`` (top, left) where its first pixel lands in the input (negative where a centre crop cuts it)."""

    photo: Size
    input: Size
    resized: Size
    offset: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """Input pixels per photo pixel, (y, x), by the rounded sizes (as ultralytics' ``scale_boxes``)."""
        return self.resized[0] / self.photo[0], self.resized[1] / self.photo[1]

    @property
    def window(self) -> tuple[int, int, int, int]:
        """The input's rows and columns that hold the photo: ``(top, left, bottom, right)``, exclusive ends."""
        top, left = max(self.offset[0], 0), max(self.offset[1], 0)
        bottom = min(self.offset[0] + self.resized[0], self.input[0])
        right = min(self.offset[1] + self.resized[1], self.input[1])
        return top, left, bottom, right

    @property
    def seen(self) -> tuple[int, int, int, int]:
        """The photo's region that the model sees, ``(x0, y0, x1, y1)`` in photo pixels, exclusive ends."""
        top, left, bottom, right = self.window
        fy, fx = self.photo[0] / self.resized[0], self.photo[1] / self.resized[1]
        y0, x0 = round((top - self.offset[0]) * fy), round((left - self.offset[1]) * fx)
        y1, x1 = round((bottom - self.offset[0]) * fy), round((right - self.offset[1]) * fx)
        return x0, y0, x1, y1

    @property
    def whole(self) -> bool:
        """Whether the model sees the whole photo and nothing else (a plain stretch)."""
        return self.offset == (0, 0) and self.resized == self.input

    def boxes_to_photo(self, boxes: np.ndarray) -> np.ndarray:
        """``[..., 4]`` x1, y1, x2, y2 in input pixels -> photo pixels, clipped to the photo (as ultralytics)."""
        shift = np.array([self.offset[1], self.offset[0]] * 2, np.float64)
        scale = np.array([self.scale[1], self.scale[0]] * 2, np.float64)
        edges = np.array([self.photo[1], self.photo[0]] * 2, np.float64)
        return np.clip((np.asarray(boxes, np.float64) - shift) / scale, 0, edges)

    def region_to_input(self, region: np.ndarray) -> np.ndarray:
        """A float32 ``[h, w]`` region of the photo (pixel weights) placed as the photo is: zero on padding."""
        return place(INTERPOLATIONS["area"](region, self.resized), self, 0)

    def map_to_photo(self, cam: np.ndarray) -> np.ndarray:
        """A float32 map at the input size -> the photo's size: the padding cut away, zero where unseen."""
        if self.whole:
            return _resize_map(cam, self.photo)
        top, left, bottom, right = self.window
        x0, y0, x1, y1 = self.seen
        out = np.zeros(self.photo, np.float32)
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1] = _resize_map(np.ascontiguousarray(cam[top:bottom, left:right]), (y1 - y0, x1 - x0))
        return out


def _resize_map(cam: np.ndarray, size: Size) -> np.ndarray:
    return cv2.resize(cam.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def _stretch(photo: Size, size: Size, resize: Resize) -> Placement:
    return Placement(photo, size, size, (0, 0))


def _letterbox(photo: Size, size: Size, resize: Resize) -> Placement:
    ratio = min(size[0] / photo[0], size[1] / photo[1])
    resized = (max(round(photo[0] * ratio), 1), max(round(photo[1] * ratio), 1))
    dh, dw = (size[0] - resized[0]) / 2, (size[1] - resized[1]) / 2
    return Placement(photo, size, resized, (round(dh - 0.1), round(dw - 0.1)))


def _crop(photo: Size, size: Size, resize: Resize) -> Placement:
    short, long = sorted(photo)
    longer = int(resize.shorter * long / short)  # torchvision's and HF's truncation
    resized = (resize.shorter, longer) if photo[0] <= photo[1] else (longer, resize.shorter)
    return _centred(photo, size, resized, resize)


def _stretch_crop(photo: Size, size: Size, resize: Resize) -> Placement:
    return _centred(photo, size, tuple(resize.scaled), resize)


def _centred(photo: Size, size: Size, resized: Size, resize: Resize) -> Placement:
    """The input's size cut from the centre of the resized photo, the margins split as ``resize.centre`` says."""
    centre = math.floor if resize.centre == "floor" else round
    margins = (resized[0] - size[0]) / 2, (resized[1] - size[1]) / 2
    return Placement(photo, size, resized, (-int(centre(margins[0])), -int(centre(margins[1]))))


def _pad(photo: Size, size: Size, resize: Resize) -> Placement:
    width = min(size[1], math.ceil(size[0] * photo[1] / photo[0]))
    return Placement(photo, size, (size[0], max(width, 1)), (0, 0))


MODES: dict[str, Callable[[Size, Size, Resize], Placement]] = {
    "stretch": _stretch,
    "letterbox": _letterbox,
    "crop": _crop,
    "stretch-crop": _stretch_crop,
    "pad": _pad,
}


def _cv2(flag: int) -> Callable[[np.ndarray, Size], np.ndarray]:
    def resample(rgb: np.ndarray, size: Size) -> np.ndarray:
        return cv2.resize(rgb, (size[1], size[0]), interpolation=flag)

    return resample


def _pil_bilinear(x: np.ndarray) -> np.ndarray:
    return np.clip(1 - np.abs(x), 0, None)


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _pil_lanczos(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)


PRECISION_BITS = 22  # PIL's fixed point for 8-bit images (Resample.c: 32 - 8 - 2)


def _pil_taps(inside: int, outside: int, kernel: Callable[[np.ndarray], np.ndarray], support: float):
    """PIL's ``precompute_coeffs`` + ``normalize_coeffs_8bpc``: per output pixel, source indices and integer
    weights (``[out, k]`` each; padding taps have weight 0)."""
    scale = inside / outside
    filterscale = max(scale, 1.0)
    reach = support * filterscale
    size = math.ceil(reach) * 2 + 1
    centre = (np.arange(outside) + 0.5) * scale
    low = np.maximum((centre - reach + 0.5).astype(np.int64), 0)
    high = np.minimum((centre + reach + 0.5).astype(np.int64), inside)
    index = low[:, None] + np.arange(size)[None, :]
    valid = index < high[:, None]
    weights = np.where(valid, kernel((index - centre[:, None] + 0.5) / filterscale), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=weights, where=total != 0)
    fixed = np.where(weights < 0, -0.5 + weights * (1 << PRECISION_BITS), 0.5 + weights * (1 << PRECISION_BITS))
    return np.minimum(index, inside - 1), np.trunc(fixed)


def _pil_pass(values: np.ndarray, axis: int, taps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """One separable pass along ``axis`` (0 rows, 1 columns) in PIL's integer arithmetic, rounded to uint8."""
    index, weights = taps
    moved = np.moveaxis(values, axis, 0).astype(np.float64)  # [in, other, 3]; integers exact in float64
    out = np.empty((index.shape[0], *moved.shape[1:]), np.uint8)
    step = max(1, (1 << 24) // max(1, moved[0].size * index.shape[1]))  # bounded memory for large photos
    for start in range(0, index.shape[0], step):
        stop = start + step
        acc = np.einsum("ok,ok...->o...", weights[start:stop], moved[index[start:stop]])
        acc = np.floor((acc + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS))
        out[start:stop] = np.clip(acc, 0, 255)
    return np.moveaxis(out, 0, axis)


def _pil(kernel: Callable[[np.ndarray], np.ndarray], support: float) -> Callable[[np.ndarray, Size], np.ndarray]:
    def resample(rgb: np.ndarray, size: Size) -> np.ndarray:
        out = rgb
        if rgb.shape[1] != size[1]:  # PIL: the horizontal pass first, each pass rounded to 8 bits
            out = _pil_pass(out, 1, _pil_taps(rgb.shape[1], size[1], kernel, support))
        if rgb.shape[0] != size[0]:
            out = _pil_pass(out, 0, _pil_taps(rgb.shape[0], size[0], kernel, support))
        return out

    return resample


# name -> resample(uint8 [h, w, 3], (height, width)) -> uint8 [height, width, 3]
INTERPOLATIONS: dict[str, Callable[[np.ndarray, Size], np.ndarray]] = {
    "area": resize_rgb,  # OpenCV: INTER_AREA shrinking, INTER_LINEAR enlarging (onnxcam's own default)
    "linear": _cv2(cv2.INTER_LINEAR),  # ultralytics, PaddleOCR
    "cubic": _cv2(cv2.INTER_CUBIC),
    "nearest": _cv2(cv2.INTER_NEAREST),
    "pil-nearest": _cv2(cv2.INTER_NEAREST_EXACT),  # PIL's NEAREST (Keras' load_img), bit-exact in OpenCV
    "pil-bilinear": _pil(_pil_bilinear, 1.0),  # PIL's Image.resize(BILINEAR): antialiased when shrinking
    "pil-bicubic": _pil(_pil_bicubic, 2.0),
    "pil-lanczos": _pil(_pil_lanczos, 3.0),
}
CENTRES = ("round", "floor")  # a centre crop's offset: torchvision rounds the margin, Hugging Face floors it


@dataclass(frozen=True)
class Resize:
    """The model card's resize convention: a :data:`MODES` name, its interpolation and its parameters."""

    mode: str = "stretch"
    interpolation: str = "area"
    pad: int = 0  # the border's grey level (letterbox, pad)
    shorter: int = 0  # crop: the shorter side before the centre crop
    scaled: tuple[int, int] = (0, 0)  # stretch-crop: the size stretched to before the centre crop
    centre: str = "round"  # crop, stretch-crop: how the margin is split (:data:`CENTRES`)

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise OnnxcamError(f"resize convention: {problem}")

    def problem(self) -> str | None:
        """What is wrong with this convention, or None."""
        if self.mode not in MODES:
            return f"mode {self.mode!r} is not one of {', '.join(MODES)}"
        if self.interpolation not in INTERPOLATIONS:
            return f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
        if type(self.pad) is not int or not 0 <= self.pad <= 255:
            return f"pad must be a grey level from 0 to 255, got {self.pad!r}"
        if self.mode == "crop" and (type(self.shorter) is not int or self.shorter < 1):
            return f"a centre crop needs the shorter side it resizes to (shorter >= 1), got {self.shorter!r}"
        scaled = self.scaled
        if self.mode == "stretch-crop" and not (len(scaled) == 2 and all(type(v) is int and v >= 1 for v in scaled)):
            return f"a stretch and centre crop needs the size it stretches to (scaled: [height, width]), got {scaled!r}"
        if self.centre not in CENTRES:
            return f"centre must be one of {', '.join(CENTRES)}, got {self.centre!r}"
        return None

    @classmethod
    def from_card(cls, value: object) -> Resize:
        """From the card's JSON object; a malformed one raises OnnxcamError."""
        if not isinstance(value, dict) or not set(value) <= {f for f in cls.__dataclass_fields__}:
            raise OnnxcamError(f"resize convention must be an object with keys from {list(cls.__dataclass_fields__)},"
                               f" got {value!r}")  # fmt: skip
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})

    def to_card(self) -> dict[str, object]:
        """The card's JSON object: the fields that differ from the defaults."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v != getattr(STRETCH, k)}

    def describe(self) -> str:
        """One line for ``onnxcam info`` and the exporter."""
        extra = {
            "letterbox": f", pad {self.pad}",
            "pad": f", pad {self.pad} on the right",
            "crop": f", shorter side {self.shorter} then centre crop ({self.centre})",
            "stretch-crop": f", {self.scaled[0]}x{self.scaled[1]} then centre crop ({self.centre})",
        }.get(self.mode, "")
        return f"{self.mode} ({self.interpolation}{extra})"

    def place(self, photo: Size, size: Size) -> Placement:
        """Where a photo of ``photo`` (height, width) lies in an input of ``size``."""
        return MODES[self.mode](tuple(photo), tuple(size), self)

    def apply(self, rgb: np.ndarray, size: Size) -> tuple[np.ndarray, Placement]:
        """The model's input (uint8 ``[*size, 3]``) from photo ``rgb``, and where the photo lies in it."""
        where = self.place(rgb.shape[:2], size)
        if where.whole and rgb.shape[:2] == tuple(size):
            return rgb, where
        resized = rgb if rgb.shape[:2] == where.resized else INTERPOLATIONS[self.interpolation](rgb, where.resized)
        return (resized if where.whole else place(resized, where, self.pad)), where


def place(resized: np.ndarray, where: Placement, fill: float) -> np.ndarray:
    """The model's input from the resized photo (or any ``[*resized, ...]`` array): ``fill`` around it, cut
    where a centre crop's input ends."""
    if where.whole:
        return resized
    out = np.full((*where.input, *resized.shape[2:]), fill, resized.dtype)
    top, left, bottom, right = where.window
    rows, cols = top - where.offset[0], left - where.offset[1]
    out[top:bottom, left:right] = resized[rows : rows + bottom - top, cols : cols + right - left]
    return out


STRETCH = Resize()
