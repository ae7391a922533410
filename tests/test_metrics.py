"""Faithfulness metrics against values computed by hand on tiny models whose answer is known."""

from __future__ import annotations

import numpy as np

from onnxcam.metrics import auc, deletion, drop_and_increase, insertion

REGION = (slice(2, 6), slice(2, 6))  # a 4x4 square in an 8x8 image


def region_brightness(images: np.ndarray) -> np.ndarray:
    """A 'model' whose class score is the mean red level inside REGION, on 0..1."""
    return images[:, REGION[0], REGION[1], 0].reshape(len(images), -1).mean(axis=1) / 255


def whole_brightness(images: np.ndarray) -> np.ndarray:
    return images[..., 0].reshape(len(images), -1).mean(axis=1) / 255


def test_average_drop_is_zero_when_the_map_keeps_what_the_model_uses() -> None:
    image = np.full((8, 8, 3), 255, np.uint8)
    on_region = np.zeros((8, 8))
    on_region[REGION] = 1
    assert drop_and_increase(region_brightness, image, on_region) == (0.0, False)
    drop, increased = drop_and_increase(region_brightness, image, np.full((8, 8), 0.5))
    np.testing.assert_allclose(drop, 100 * (1 - 128 / 255))  # 255 * 0.5 rounds to 128
    assert not increased


def test_deletion_curve_and_auc_by_hand() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = 255  # left half white: mean colour 127.5 -> grey 128
    cam = np.zeros((8, 8))
    cam[:, :4] = 1  # the white pixels are deleted first
    area, curve = deletion(whole_brightness, image, cam, steps=64)
    # after k deletions: white pixels left at 255, deleted ones at 128, black ones at 0 (then 128)
    k = np.arange(65)
    expected = np.where(k <= 32, (32 - k) * 255 + k * 128, 32 * 128 + (k - 32) * 128) / (64 * 255)
    np.testing.assert_allclose(curve, expected)
    np.testing.assert_allclose(area, np.trapezoid(expected, np.linspace(0, 1, 65)))


def test_insertion_rewards_a_map_on_the_region_the_model_uses() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    image[REGION] = 255
    on_region, elsewhere = np.zeros((8, 8)), np.ones((8, 8))
    on_region[REGION], elsewhere[REGION] = 1, 0
    good, curve = insertion(region_brightness, image, on_region, steps=64, blur_sigma=1.0)
    bad, _ = insertion(region_brightness, image, elsewhere, steps=64, blur_sigma=1.0)
    np.testing.assert_allclose(curve[16:], 1.0)  # the 16 region pixels come first: full score from then on
    assert curve[0] < 1 and good > bad


def test_auc_is_the_trapezoid_rule() -> None:
    curve = np.array([1.0, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(auc(curve), np.trapezoid(curve, np.linspace(0, 1, 4)))


def test_pointing_game_by_hand() -> None:
    from onnxcam.metrics import pointing_game

    cam = np.zeros((10, 10))
    cam[2, 3], cam[8, 8] = 1.0, 0.5
    assert pointing_game(cam, [0, 0, 4, 4]) == (True, 1 / 1.5)  # the peak (x=3, y=2) and 2/3 of the mass
    assert pointing_game(cam, [5, 5, 9, 9]) == (False, 0.5 / 1.5)
