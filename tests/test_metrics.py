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


def test_linear_imputation_is_exact_on_a_linear_image() -> None:
    """Each removed pixel is the mean of its symmetric neighbours: a plane is its own solution."""
    from onnxcam.metrics import impute

    yy, xx = np.mgrid[0:40, 0:40]
    plane = np.dstack([2 * xx + yy, 100 + xx - yy, 3 * yy]).astype(np.uint8)
    removed = np.zeros((40, 40), bool)
    removed[8:20, 10:30] = removed[25:35, 3:9] = True
    np.testing.assert_array_equal(impute(plane, removed, noise=0.0), plane)
    noisy = impute(plane, removed, noise=0.01, seed=3)
    assert 1.0 < np.std(noisy[removed].astype(float) - plane[removed]) < 4.0  # 0.01 x 255 = 2.55
    np.testing.assert_array_equal(noisy[~removed], plane[~removed])


def test_road_morf_falls_below_lerf_for_a_map_on_what_the_model_uses() -> None:
    from onnxcam.metrics import road

    image = np.zeros((16, 16, 3), np.uint8)
    image[5:11, 5:11] = 255  # a bright square the 'model' scores
    region = (slice(5, 11), slice(5, 11))
    score = lambda images: images[:, region[0], region[1], 0].reshape(len(images), -1).mean(axis=1) / 255  # noqa: E731
    cam = np.zeros((16, 16))
    cam[region] = 1 + np.linspace(0, 0.1, 36).reshape(6, 6)  # ties broken
    result = road(score, image, cam, percentiles=(10, 50))
    assert result["road_morf_curve"][1] < 0.05  # half the pixels, the square first: filled from the dark
    assert result["road_lerf_curve"] == [1.0, 1.0]  # the dark pixels go first: the square stays
    assert result["road_morf"] < result["road_lerf"]
