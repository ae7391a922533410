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


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 ``[H, W, 3]`` RGB (grayscale, alpha and 16-bit converted)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxcamError(f"image {path} not found")
    data = path.read_bytes()
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
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the whole image to ``(height, width)`` (no crop, so the map covers every pixel)."""
    height, width = size
    shrinking = rgb.shape[0] > height or rgb.shape[1] > width
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
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

    _atomic(path, write)


def write_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, array)

    _atomic(path, write)
