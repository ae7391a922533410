"""The bias workflow end to end: a model that learned the background is caught by `onnxcam audit`.

Trains two small CNNs with torch (seconds), grafts them with --from, and audits both on
test images whose backgrounds belong to another class (`onnxcam_export.bias_demo`).
Measured with these seeds: the biased model is 0% accurate with 96-100% of its maps' mass
on the background and every image flagged; the fair one is 100% accurate, 32-80% on the
background (the object boxes cover about 9% of each image), none flagged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from onnxcam_export.bias_demo import build

    return build(tmp_path_factory.mktemp("bias"))


def _audit(demo: dict, name: str, out: Path) -> dict:
    args = [sys.executable, "-m", "onnxcam", "audit", demo["test"], "--boxes", demo["boxes"],
            "--model", demo["models"][name], "--out", str(out), "--json"]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_audit_catches_the_model_that_learned_the_background(demo: dict, tmp_path: Path) -> None:
    report = _audit(demo, "biased", tmp_path / "biased")
    images = sum(row["images"] for row in report["classes"].values())
    for label, row in report["classes"].items():
        assert row["accuracy"] < 0.2, label
        assert row["background_share"] > 0.9, (label, row)
    assert len(report["flagged"]) >= 0.9 * images
    page = (tmp_path / "biased" / "index.html").read_text()
    assert page.count('"flagged": true') == len(report["flagged"]), "the report marks them (and lists them first)"


def test_the_fair_model_looks_at_the_object(demo: dict, tmp_path: Path) -> None:
    report = _audit(demo, "fair", tmp_path / "fair")
    images = sum(row["images"] for row in report["classes"].values())
    for label, row in report["classes"].items():
        assert row["accuracy"] > 0.9, label
        assert row["background_share"] < 0.85, (label, row)
    assert len(report["flagged"]) <= 0.1 * images
