"""Facts about real photos with the real pretrained EfficientNet-Lite0 (hand-measured boxes)."""

from __future__ import annotations

from pathlib import Path

from onnxcam import Explainer
from tests.conftest import EXAMPLES

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CAT_FACE = (90, 30, 400, 290)  # x0, y0, x1, y1 in chelsea.png (451x300): ears excluded, eyes to chin
CUP = (170, 15, 410, 290)  # the cup in coffee.png (600x400), rim to foot, handle excluded
COFFEE_SURFACE = (205, 95, 370, 195)  # the espresso inside the cup


def _inside(point: tuple[int, int], box: tuple[int, int, int, int]) -> bool:
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def test_cat_photo_is_a_cat_and_the_map_peaks_on_its_face(lite0_model: Path) -> None:
    result = Explainer(lite0_model).explain(EXAMPLES / "chelsea.png", top_k=3)
    assert result.predictions[0].index in CAT_CLASSES
    for m in result.maps:
        assert m.index in CAT_CLASSES
        assert m.cam.shape == (300, 451) and not m.empty
        assert _inside(m.peak, CAT_FACE), f"{m.label}: peak {m.peak} outside the face box"


def test_espresso_map_peaks_on_the_coffee_and_cup_map_on_the_cup(lite0_model: Path) -> None:
    explainer = Explainer(lite0_model)
    result = explainer.explain(EXAMPLES / "coffee.png", targets=["espresso", "cup"])
    assert result.predictions[0].label == "espresso"
    espresso, cup = result.maps
    assert _inside(espresso.peak, COFFEE_SURFACE), espresso.peak
    assert _inside(cup.peak, CUP), cup.peak
    x0, y0, x1, y1 = CUP
    inside = cup.cam[y0:y1, x0:x1].sum() / cup.cam.sum()
    area = (x1 - x0) * (y1 - y0) / cup.cam.size
    assert inside > 1.5 * area, f"map mass on the cup {inside:.2f} vs its area share {area:.2f}"
