"""The bias workflow end to end, as the README's example runs it: `onnxcam audit` catches the model
that learned the background.

The README block trains two small CNNs with torch (seconds), grafts them with --from, and
audits both on test images whose backgrounds belong to another class (`scripts/bias_demo.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxcam.audit import RECORDS, summary
from tests.test_readme import run_example

pytest.importorskip("torch")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("readme-bias")
    result = run_example("bias", folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image(s) where the model looks mostly off the object" in result.stdout
    return folder


def _audit(demo: Path, name: str) -> tuple[dict, list[dict]]:
    records = [json.loads(line) for line in (demo / f"audit-{name}" / RECORDS).read_text().splitlines()]
    assert records and not any(r["error"] for r in records)
    return summary(records), [r for r in records if r["flagged"]]


def test_audit_catches_the_model_that_learned_the_background(demo: Path) -> None:
    classes, flagged = _audit(demo, "biased")
    images = sum(row["images"] for row in classes.values())
    for label, row in classes.items():
        assert row["accuracy"] < 0.2, label
        assert row["background_share"] > 0.9, (label, row)
    assert len(flagged) >= 0.9 * images
    page = (demo / "audit-biased" / "index.html").read_text()
    assert page.count('"flagged": true') == len(flagged), "the report marks them (and lists them first)"


def test_the_fair_model_looks_at_the_object(demo: Path) -> None:
    classes, flagged = _audit(demo, "fair")
    images = sum(row["images"] for row in classes.values())
    for label, row in classes.items():
        assert row["accuracy"] > 0.9, label
        assert row["background_share"] < 0.85, (label, row)
    assert len(flagged) <= 0.1 * images
