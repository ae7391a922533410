"""RF-DETR (``rfdetr``, Nano, random weights) exported by its own ``export()`` and grafted with no flag.

Its file has no metadata: the layout is told by its output names (``dets``, ``labels``: a sigmoid DETR, every query
and class a detection), the size by the input, the ImageNet mean and std are assumed (RF-DETR's own). Checks:
the kept detections are those of RF-DETR's ``predict`` on the same photo (classes, scores, boxes), and each map
varies. Its gradients are not compared with a finite difference: its two-stage query selection is a TopK (as
RT-DETR's in ``tests/test_corpus.py``). Runs where ``rfdetr`` imports (a venv with torch 2.14.1 + torchvision 0.29.1
and ``rfdetr``); skipped elsewhere, with the reason. Slow.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam_export.from_onnx import graft_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:
    import torch
    from PIL import Image
    from rfdetr import RFDETRNano
except Exception as exc:  # ImportError, or torchvision's operator errors when releases do not match
    pytest.skip(f"rfdetr does not import here ({type(exc).__name__}: {exc})"[:300], allow_module_level=True)

pytestmark = pytest.mark.slow


def test_an_rfdetr_export_is_explained_as_rfdetr_predicts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model = RFDETRNano(pretrain_weights=None, num_classes=5)
        source = Path(model.export(output_dir=str(tmp_path), verbose=False))
    card, notes = graft_file(source, tmp_path / "rfdetr.cam.onnx")
    assert card["task"] == "detection" and any("scored by sigmoids" in n for n in notes), notes
    assert "24x24 grid" in card["layer"], card["layer"]  # 384 / 16: its projector's features
    photo = np.random.default_rng(0).integers(0, 256, (384, 384, 3), dtype=np.uint8)  # (the input's size: no resize)
    theirs = model.predict(Image.fromarray(photo), threshold=0.0)
    ours = Explainer(tmp_path / "rfdetr.cam.onnx").explain(photo, top_k=10, conf=0.0).maps
    assert [m.index for m in ours] == theirs.class_id[:10].tolist()
    np.testing.assert_allclose([m.probability for m in ours], theirs.confidence[:10], rtol=1e-4)
    np.testing.assert_allclose([m.box for m in ours], theirs.xyxy[:10], atol=0.05)
    assert all(np.ptp(m.cam) > 0 for m in ours), "maps that vary"
