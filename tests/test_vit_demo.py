"""A small ViT trained on synthetic scenes, as the README's example runs it: its maps sit on the object.

The README block trains the ViT with torch (``scripts/vit_demo.py``: the class is the colour of a
disc or square on grey noise, so only the object tells it), grafts it with ``--from`` and explains
the test images. Grad-CAM, attention rollout and attention relevance must put their mass on the
object, and pass the model-parameter randomisation test (Adebayo et al., NeurIPS 2018): the maps
of the same architecture with untrained weights must not resemble them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxcam import Explainer
from onnxcam.maps import box_share
from onnxcam_export.from_onnx import Preprocessing, graft_file
from tests.conftest import ROOT
from tests.test_readme import run_example
from tests.test_sanity import spearman

pytest.importorskip("torch")
pytestmark = pytest.mark.slow
METHODS = ["gradcam", "rollout", "attention-relevance"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("readme-vit")
    result = run_example("vit", folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 + 64 tokens of 32, 8x8 grid, class token dropped" in result.stdout
    assert "explained 30 of 30 images" in result.stdout
    return folder / "vit-demo"


def _maps(model: Path, boxes: dict, root: Path) -> dict[str, list]:
    """Per method, (right class?, map) for each image of ``boxes`` (paths relative to ``root``)."""
    explainer = Explainer(model)
    found: dict[str, list] = {}
    for path in boxes:
        result = explainer.explain(root / path, top_k=1, method=METHODS)
        for m in result.maps:
            found.setdefault(m.method, []).append((Path(path).parent.name == m.label, m.cam))
    return found


def test_the_vit_is_right_and_its_maps_sit_on_the_object(demo: Path) -> None:
    """Measured: 100% right; map mass in the object's box 0.41-0.47 where the box covers 0.08."""
    boxes = json.loads((demo / "boxes.json").read_text())
    area = np.mean([(x1 - x0 + 1) * (y1 - y0 + 1) / 64**2 for x0, y0, x1, y1 in boxes.values()])
    for method, maps in _maps(demo / "vit.cam.onnx", boxes, demo.parent).items():
        assert np.mean([right for right, _ in maps]) >= 0.9, method
        share = np.mean([box_share(cam, box) for (_, cam), box in zip(maps, boxes.values(), strict=True)])
        assert share > 3 * area, (method, share, area)


def test_maps_change_when_the_weights_are_randomised(demo: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from vit_demo import build_vit, export_plain

    export_plain(build_vit(seed=1).eval(), tmp_path / "random.onnx")
    graft_file(tmp_path / "random.onnx", tmp_path / "random.cam.onnx", labels=demo / "labels.txt",
               prep=Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False))  # fmt: skip
    boxes = json.loads((demo / "boxes.json").read_text())
    trained = _maps(demo / "vit.cam.onnx", boxes, demo.parent)
    untrained = _maps(tmp_path / "random.cam.onnx", boxes, demo.parent)
    for method in METHODS:
        rho = np.mean([spearman(a, b) for (_, a), (_, b) in zip(trained[method], untrained[method], strict=True)])
        assert rho < 0.5, (method, rho)
