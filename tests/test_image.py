"""Reading photos: every common flavour becomes uint8 RGB, in RGB order; limits hold before decoding."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from onnxcam.errors import OnnxcamError
from onnxcam.image import header, read_rgb, resize_rgb
from tests.conftest import EXAMPLES


def test_colour_order_is_rgb(tmp_path: Path) -> None:
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 2] = 255  # red, in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    assert (read_rgb(tmp_path / "red.png")[0, 0] == [255, 0, 0]).all()


@pytest.mark.parametrize(
    ("name", "pixels", "expected"),
    [
        ("gray.png", np.full((3, 5), 77, np.uint8), [77, 77, 77]),
        ("rgba.png", np.dstack([np.full((3, 5), c, np.uint8) for c in (10, 20, 30, 128)]), [30, 20, 10]),
        ("deep.png", np.full((3, 5, 3), 40000, np.uint16), [156, 156, 156]),  # 16-bit: 40000 / 257
        ("gray.jpg", np.full((3, 5), 200, np.uint8), [200, 200, 200]),
    ],
)
def test_grayscale_alpha_and_16_bit_become_rgb(
    name: str, pixels: np.ndarray, expected: list[int], tmp_path: Path
) -> None:
    cv2.imwrite(str(tmp_path / name), pixels)  # OpenCV writes channels as BGR(A)
    rgb = read_rgb(tmp_path / name)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 5, 3)
    np.testing.assert_allclose(rgb[1, 2], expected, atol=1)


def test_resize_covers_the_whole_image() -> None:
    image = np.zeros((300, 451, 3), np.uint8)
    image[:, -10:] = 255  # a bright right edge must survive: no crop
    small = resize_rgb(image, (224, 224))
    assert small.shape == (224, 224, 3) and small[:, -3:].min() > 200


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(OnnxcamError, match="not found"):
        read_rgb(tmp_path / "nope.png")


# -- every accepted format is sized from its header, before anything is decoded ----------------
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".tiff": "TIFF", ".webp": "WebP", ".ppm": "PNM", ".pgm": "PNM"}


@pytest.mark.parametrize("ext", FORMATS)
def test_header_gives_the_size_of_every_accepted_format(ext: str, tmp_path: Path) -> None:
    """Reference: OpenCV's own encoder wrote a 37 x 23 image in that format."""
    pixels = np.random.default_rng(0).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    ok, data = cv2.imencode(ext, pixels[..., 0] if ext == ".pgm" else pixels)  # PGM is grey
    assert ok
    kind, size, complete = header(data.tobytes())
    assert (kind, size, complete) == (FORMATS[ext], (37, 23), True)
    (tmp_path / f"x{ext}").write_bytes(data.tobytes())
    assert read_rgb(tmp_path / f"x{ext}").shape == (23, 37, 3)


def test_webp_lossless_and_extended_headers() -> None:
    """VP8L and VP8X store their sizes differently from lossy VP8; Pillow writes both."""
    image = pytest.importorskip("PIL.Image").new("RGBA", (301, 7))
    for options in ({"lossless": True}, {"lossless": False, "exif": b"Exif\x00\x00II*\x00"}):
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", **options)
        assert header(buffer.getvalue())[1] == (301, 7)


def _rle_bmp(width: int, height: int) -> bytes:
    """An 8-bit run-length-encoded BMP (BI_RLE8): a few hundred bytes that decode to width x height."""
    palette = bytes(4 * 256)
    pixels = b"\x00\x01"  # end of bitmap
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def _big_tiff(width: int, height: int) -> bytes:
    """A little-endian TIFF whose first directory declares width x height (and one tiny strip)."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (279, 4, 1, 1)]  # fmt: skip
    directory = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    return b"II*\x00" + struct.pack("<I", 16) + bytes(8) + directory


@pytest.mark.parametrize(
    ("name", "data"),
    [("rle.bmp", _rle_bmp(20000, 20000)), ("huge.tiff", _big_tiff(20000, 20000))],
)
def test_pixel_limit_holds_before_decoding_for_every_format(name: str, data: bytes, tmp_path: Path) -> None:
    """A 1 KB file that would decode to 1.2 GB is refused from its header ("is", not "has": no decode)."""
    (tmp_path / name).write_bytes(data)
    assert len(data) < 2000 and header(data)[1] == (20000, 20000)
    with pytest.raises(OnnxcamError, match=r"is 20000x20000 pixels, over the limit of 100,000,000"):
        read_rgb(tmp_path / name)


def test_an_unknown_format_is_refused_without_decoding(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(OnnxcamError, match="not a readable image"):
        read_rgb(tmp_path / "x.png")


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_data_after_the_end_marker_is_ignored(ext: str, tmp_path: Path) -> None:
    """A phone's Motion Photo: a JPEG (or PNG) with a video appended. OpenCV decodes it; so do we."""
    pixels = cv2.imread(str(EXAMPLES / "chelsea.png"))
    data = cv2.imencode(ext, pixels)[1].tobytes()
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64
    (tmp_path / f"motion{ext}").write_bytes(data + video)
    (tmp_path / f"plain{ext}").write_bytes(data)
    np.testing.assert_array_equal(read_rgb(tmp_path / f"motion{ext}"), read_rgb(tmp_path / f"plain{ext}"))


def test_a_jpeg_thumbnail_end_marker_does_not_hide_truncation(tmp_path: Path) -> None:
    """EXIF thumbnails carry their own end marker: the walker skips them by segment length."""
    image = pytest.importorskip("PIL.Image").fromarray(np.zeros((64, 64, 3), np.uint8))
    thumb = io.BytesIO()
    image.resize((8, 8)).save(thumb, format="JPEG")
    app1 = b"Exif\x00\x00" + thumb.getvalue()  # not a valid EXIF block, but a segment holding FFD9
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG")
    data = jpeg.getvalue()
    data = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    assert header(data)[2] is True
    assert header(data[: len(data) // 2])[2] is False


def test_files_over_the_byte_limit_are_refused_before_reading(tmp_path: Path) -> None:
    """A sparse 2 GiB file: refused from its size, never read into memory."""
    big = tmp_path / "big.jpg"
    with big.open("wb") as f:
        f.truncate(2 * 1024**3)
    with pytest.raises(OnnxcamError, match=r"2,048.0 MiB, over the limit of 512.0 MiB; shrink it or raise --max-bytes"):
        read_rgb(big)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_a_named_pipe_is_not_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(OnnxcamError, match="not a regular file"):
        read_rgb(tmp_path / "pipe.png")  # returns at once: never opened
