"""Reading photos: every common PNG/JPEG flavour becomes uint8 RGB, in RGB order."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from onnxcam.errors import OnnxcamError
from onnxcam.image import read_rgb, resize_rgb


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
