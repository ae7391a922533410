"""`onnxcam eval` on the real pretrained Lite0 and the two bundled photos, with hand-measured boxes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, ROOT
from tests.test_meaning import CAT_FACE, CUP

BOXES = {str(EXAMPLES / "chelsea.png"): list(CAT_FACE), str(EXAMPLES / "coffee.png"): list(CUP)}
SIZES = {"chelsea.png": (451, 300), "coffee.png": (600, 400)}


@pytest.mark.slow  # ROAD: 18 imputations per photo
def test_eval_metrics_on_real_photos(lite0_model: Path, tmp_path: Path) -> None:
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(BOXES))
    args = [sys.executable, "-m", "onnxcam", "eval", str(EXAMPLES / "chelsea.png"), str(EXAMPLES / "coffee.png"),
            "--model", str(lite0_model), "--boxes", str(boxes), "--steps", "16", "--road", "--json"]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["mean"]["pointing_game_percent"] == 100.0
    for row in doc["images"]:
        x0, y0, x1, y1 = BOXES[row["path"]]
        width, height = SIZES[Path(row["path"]).name]
        area = (x1 - x0 + 1) * (y1 - y0 + 1) / (width * height)
        assert row["energy_pointing_game"] > area, "more of the map on the object than a uniform map puts there"
        assert row["insertion_auc"] > row["deletion_auc"], "salient pixels first: the score rises fast, falls fast"
        assert 0 <= row["average_drop"] <= 100
        assert row["road_morf"] < row["road_lerf"], "removing the salient pixels first hurts more (ROAD)"
