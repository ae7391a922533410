"""Reading photos safely. Arrays here are RGB; OpenCV's BGR stays inside this file.

Before anything is decoded, a file must be a regular file under the byte limit, its header
must give its size (every accepted format is sized from its header: JPEG, PNG, BMP, TIFF,
WebP, PNM), the size must be under the pixel limit, and a JPEG or PNG must reach its end
marker (data after it, such as the video of a phone's "Motion Photo", is ignored).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from onnxcam.errors import OnnxcamError

MAX_PIXELS = 100_000_000  # refuse larger images rather than decode gigabytes
MAX_BYTES = 512 * 1024 * 1024  # refuse larger files before reading them

Size = tuple[int, int]  # (width, height)
Header = tuple[Size | None, bool]  # (size from the header, whether the file reaches its end marker)

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # in entropy-coded data: the next real marker


def _u(data: bytes, start: int, size: int, order: str = "big") -> int:
    return int.from_bytes(data[start : start + size], order)  # type: ignore[arg-type]


def _jpeg(data: bytes) -> Header:
    """Walk the segments (lengths skip EXIF thumbnails) and the entropy-coded scans up to EOI."""
    size, i = None, 2
    while i + 2 <= len(data):
        if data[i] != 0xFF:
            return size, False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # EOI
            return size, True
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        end = i + 2 + _u(data, i + 2, 2)
        if marker in _JPEG_SOF and i + 9 <= len(data):
            size = (_u(data, i + 7, 2), _u(data, i + 5, 2))
        if marker == 0xDA:  # start of scan: skip the entropy-coded data to the next marker
            found = _JPEG_MARKER.search(data, end)
            if found is None:
                return size, False
            end = found.start()
        i = end
    return size, False


def _png(data: bytes) -> Header:
    size, i = None, 8
    while i + 12 <= len(data):
        kind = data[i + 4 : i + 8]
        if kind == b"IHDR":
            size = (_u(data, i + 8, 4), _u(data, i + 12, 4))
        if kind == b"IEND":
            return size, True
        i += 12 + _u(data, i, 4)
    return size, False


def _bmp(data: bytes) -> Header:
    if _u(data, 14, 4, "little") == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return (_u(data, 18, 2, "little"), _u(data, 20, 2, "little")), True
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)  # negative: stored top-down
    return (abs(width), abs(height)), True


def _tiff(data: bytes) -> Header:
    """Width and length tags of the first image file directory (classic TIFF and BigTIFF)."""
    order = "little" if data[:2] == b"II" else "big"
    big = _u(data, 2, 2, order) == 43
    offset = _u(data, 8, 8, order) if big else _u(data, 4, 4, order)
    count_size, entry_size, value_at = (8, 20, 12) if big else (2, 12, 8)
    count = _u(data, offset, count_size, order)
    tags: dict[int, int] = {}
    for k in range(min(count, 4096)):
        entry = offset + count_size + k * entry_size
        tag, kind = _u(data, entry, 2, order), _u(data, entry + 2, 2, order)
        width = {3: 2, 4: 4, 16: 8}.get(kind)  # SHORT, LONG, LONG8
        if tag in (256, 257) and width:
            tags[tag] = _u(data, entry + value_at, width, order)
    return ((tags[256], tags[257]) if {256, 257} <= set(tags) else None), True


def _webp(data: bytes) -> Header:
    kind = data[12:16]
    if kind == b"VP8X":
        return (1 + _u(data, 24, 3, "little"), 1 + _u(data, 27, 3, "little")), True
    if kind == b"VP8L" and data[20:21] == b"\x2f":
        bits = _u(data, 21, 4, "little")
        return (1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)), True
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return (_u(data, 26, 2, "little") & 0x3FFF, _u(data, 28, 2, "little") & 0x3FFF), True
    return None, True


def _pnm(data: bytes) -> Header:
    text = re.sub(rb"#[^\n]*", b" ", data[2:512])  # comments may sit between the numbers
    numbers = text.split()[:2]
    if len(numbers) == 2 and all(n.isdigit() for n in numbers):
        return (int(numbers[0]), int(numbers[1])), True
    return None, True


# format name -> (does the file start like this?, header reader)
FORMATS: dict[str, tuple[Callable[[bytes], bool], Callable[[bytes], Header]]] = {
    "JPEG": (lambda d: d[:2] == b"\xff\xd8", _jpeg),
    "PNG": (lambda d: d[:8] == b"\x89PNG\r\n\x1a\n", _png),
    "BMP": (lambda d: d[:2] == b"BM" and len(d) >= 26, _bmp),
    "TIFF": (lambda d: d[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), _tiff),
    "WebP": (lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", _webp),
    "PNM": (lambda d: len(d) > 2 and d[:1] == b"P" and d[1:2] in b"123456" and d[2:3].isspace(), _pnm),
}


def header(data: bytes) -> tuple[str, Size | None, bool] | None:
    """(format, (width, height) or None, reaches its end marker) without decoding; None if unknown."""
    for name, (matches, read) in FORMATS.items():
        if matches(data):
            try:
                size, complete = read(data)
            except (IndexError, ValueError):  # a header cut short
                size, complete = None, False
            return name, size, complete
    return None


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise OnnxcamError(f"image {path} not found") from None
    except OSError as exc:
        raise OnnxcamError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise OnnxcamError(f"image {path} is not a regular file (a folder, pipe or device); give an image file")
    if info.st_size == 0:
        raise OnnxcamError(f"image {path} is empty (0 bytes)")
    if info.st_size > max_bytes:
        raise OnnxcamError(
            f"image {path} is {info.st_size / 2**20:,.1f} MiB, over the limit of {max_bytes / 2**20:,.1f} MiB; "
            "shrink it or raise --max-bytes"
        )
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0))) as f:
            return f.read(max_bytes + 1)
    except OSError as exc:
        raise OnnxcamError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_rgb(path: str | Path, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Decode an image file to uint8 ``[H, W, 3]`` RGB, after the checks of the module docstring.

    Grayscale, alpha, palette, 16-bit and CMYK are converted and the EXIF orientation is
    applied (OpenCV's ``IMREAD_COLOR``).
    """
    return decode_rgb(_read_bytes(Path(path), max_bytes), path, max_pixels)


def decode_rgb(data: bytes, path: object, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image's bytes (named ``path`` in messages) after the header checks; see :func:`read_rgb`."""
    found = header(data)
    if found is None:
        raise OnnxcamError(f"{path} is not a readable image (not a JPEG, PNG, BMP, TIFF, WebP or PNM file)")
    kind, size, complete = found
    if size is None:
        raise OnnxcamError(f"{path} is not a readable image (its {kind} header gives no size)")
    if size[0] * size[1] > max_pixels:
        raise OnnxcamError(
            f"image {path} is {size[0]}x{size[1]} pixels, over the limit of {max_pixels:,}; "
            "shrink it or raise --max-pixels"
        )
    if not complete:
        raise OnnxcamError(f"image {path} is a truncated {kind} (its end marker is missing); re-copy or re-export it")
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    del data
    if bgr is None or bgr.size == 0:
        raise OnnxcamError(f"{path} is not a readable image (corrupt, or a {kind} variant OpenCV cannot decode)")
    if bgr.shape[0] * bgr.shape[1] > max_pixels:
        raise OnnxcamError(f"image {path} has {bgr.shape[1]}x{bgr.shape[0]} pixels, over the limit of {max_pixels:,}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)  # in place: a large photo is not copied


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the whole image to ``(height, width)`` (no crop, so the map covers every pixel)."""
    height, width = size
    if rgb.shape[:2] == (height, width):
        return rgb
    shrinking = rgb.shape[0] > height or rgb.shape[1] > width
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def read_mask(
    path: str | Path, size: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES
) -> np.ndarray:
    """A region from an image file (grayscale or binary, any format :func:`read_rgb` reads): bool ``[H, W]``,
    True where a pixel is not black. An unreadable file, one without such a pixel, or one whose header gives
    another size than ``size`` (height, width; checked before decoding) raises OnnxcamError."""
    try:
        data = _read_bytes(Path(path), max_bytes)
        found = header(data)
        if size is not None and found is not None and found[1] is not None and found[1][::-1] != tuple(size):
            (width, height), (h, w) = found[1], size
            raise OnnxcamError(f"the mask is {width}x{height} pixels but the image is {w}x{h}; give a mask the size "
                               "of the image")  # fmt: skip
        inside = decode_rgb(data, path, max_pixels).any(axis=2)
    except OnnxcamError as exc:
        raise OnnxcamError(f"--mask: {exc}") from None
    if not inside.any():
        raise OnnxcamError(f"--mask {path} has no non-zero pixel: the region it gives is empty")
    return inside
