"""Grad-CAM arithmetic and the overlay, against formulas computed another way."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcam.maps import normalize, upsample
from onnxcam.overlay import heatmap_rgb, overlay_rgb


def test_all_zero_map_stays_zero_and_is_flagged() -> None:
    cam, empty = normalize(np.zeros((3, 3)))
    assert empty and not np.isnan(cam).any() and (cam == 0).all()


def test_normalize_spans_zero_to_one() -> None:
    cam, empty = normalize(np.array([[1.0, 3.0], [2.0, 5.0]]))
    assert not empty
    np.testing.assert_allclose(cam, [[0, 0.5], [0.25, 1]])


def test_upsample_keeps_a_constant_map_and_the_image_size() -> None:
    big = upsample(np.full((7, 7), 0.25), (300, 451))
    assert big.shape == (300, 451)
    np.testing.assert_allclose(big, 0.25, rtol=1e-6)


def test_jet_is_red_at_the_top_and_blue_at_the_bottom_in_rgb() -> None:
    hot, cold = heatmap_rgb(np.ones((1, 1)))[0, 0], heatmap_rgb(np.zeros((1, 1)))[0, 0]
    assert hot[0] > 100 and hot[2] == 0, f"JET's high end is red in RGB, got {hot}"
    assert cold[2] > 100 and cold[0] == 0, f"JET's low end is blue in RGB, got {cold}"


def test_overlay_is_the_weighted_blend() -> None:
    photo = np.full((2, 2, 3), 100, dtype=np.uint8)
    cam = np.ones((2, 2), dtype=np.float32)
    hot = heatmap_rgb(cam).astype(np.float64)
    np.testing.assert_array_equal(overlay_rgb(photo, cam, 0.4), np.rint(0.4 * hot + 0.6 * 100).astype(np.uint8))
    np.testing.assert_array_equal(overlay_rgb(photo, cam, 0.0), photo)
    with pytest.raises(ValueError, match="alpha"):
        overlay_rgb(photo, cam, 1.5)
