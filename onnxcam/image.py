"""Reading photos and writing results. Arrays here are RGB; OpenCV's BGR stays inside this file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from onnxcam.errors import OnnxcamError

# (signature, end marker): a file that starts like one of these but lacks its end marker
# was cut short. Checked before decoding, because libjpeg/libpng complain on stderr.
_END_MARKERS = {"JPEG": (b"\xff\xd8", b"\xff\xd9"), "PNG": (b"\x89PNG\r\n\x1a\n", b"IEND")}


MAX_PIXELS = 100_000_000  # refuse larger images rather than decode gigabytes

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding; None for other formats."""
    if data.startswith(_END_MARKERS["PNG"][0]) and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(_END_MARKERS["JPEG"][0]):
        i = 2
        while i + 9 <= len(data) and data[i] == 0xFF:
            marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
            if marker in _JPEG_SOF:
                return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
            i += 2 + length
    return None


def read_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file to uint8 ``[H, W, 3]`` RGB.

    Grayscale, alpha, palette, 16-bit and CMYK are converted and the EXIF orientation is
    applied (OpenCV's ``IMREAD_COLOR``). Larger than ``max_pixels`` is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxcamError(f"image {path} not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OnnxcamError(f"cannot read {path}: {exc.strerror or exc}") from exc
    size = header_size(data)
    if size and size[0] * size[1] > max_pixels:
        raise OnnxcamError(
            f"image {path} is {size[0]}x{size[1]} pixels, over the limit of {max_pixels:,}; "
            "shrink it or raise --max-pixels"
        )
    if not data:
        raise OnnxcamError(f"image {path} is empty (0 bytes)")
    for kind, (start, end) in _END_MARKERS.items():
        if data.startswith(start) and end not in data[-64:]:
            raise OnnxcamError(
                f"image {path} is a truncated {kind} (its end marker is missing); re-copy or re-export it"
            )
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OnnxcamError(f"{path} is not a readable image (corrupt, truncated, or not an image format OpenCV reads)")
    if bgr.shape[0] * bgr.shape[1] > max_pixels:
        raise OnnxcamError(f"image {path} has {bgr.shape[1]}x{bgr.shape[0]} pixels, over the limit of {max_pixels:,}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the whole image to ``(height, width)`` (no crop, so the map covers every pixel)."""
    height, width = size
    shrinking = rgb.shape[0] > height or rgb.shape[1] > width
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write to ``path`` through a temporary name, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_png_rgb(path: Path, rgb: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OnnxcamError(f"could not encode {path} as PNG")
        tmp.write_bytes(encoded.tobytes())

    atomic_write(path, write)


def write_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, array)

    atomic_write(path, write)
