"""Hostile and odd input on the newer surfaces (issue #22): each case failed before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from onnxcam import maps
from onnxcam.errors import OnnxcamError, printable
from onnxcam.outputs import safe_stem
from tests.conftest import EXAMPLES
from tests.test_cli import assert_clean_failure, run


def test_a_map_whose_range_is_below_float32s_normal_numbers_is_empty_never_nan() -> None:
    """A BatchNorm network with HF's default random init scores ~1e-43: its maps' range is a denormal, and
    1 / range overflowed to inf (NaN in the map and in ``top20_mass``)."""
    cam = np.zeros((7, 7), np.float32)
    cam[3, 3] = 1e-43
    finished, empty = maps.finish(cam, (224, 224))
    assert empty and not finished.any() and not np.isnan(finished).any()
    json.dumps(maps.stats(finished), allow_nan=False)  # strict JSON


def test_bidi_controls_and_undecodable_bytes_are_escaped_on_the_terminal() -> None:
    shown = printable("cat\u202egnp.exe\udcff\x1b[31m")
    assert "\u202e" not in shown and "\udcff" not in shown and "\x1b" not in shown
    assert shown == "cat\\u202egnp.exe\\udcff\\x1b[31m"
    assert safe_stem("caf\udce9 \u202e.png") == "caf_ \u202e"  # (a file name may hold any printable text)


def test_a_file_name_that_is_not_utf8_is_explained_and_reported(lite0_model: Path, tmp_path: Path) -> None:
    """Old archives and Samba shares hold names with Latin-1 bytes: the whole run aborted (UnicodeEncodeError)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(EXAMPLES / "chelsea.png", bytes(photos) + b"/caf\xe9.png")
    out = tmp_path / "out"
    result = run("explain", str(photos), "--model", str(lite0_model), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["summary"]["explained"] == 1
    assert (out / "caf__285_egyptian-cat.png").is_file() and "caf%E9.png" in (out / "index.html").read_text()
    plain = run("explain", str(photos), "--model", str(lite0_model), "--out", str(tmp_path / "again"))
    assert plain.returncode == 0 and "caf\\udce9.png" in plain.stdout, plain.stderr


HOSTILE_JSON = ["[" * 5000 + "]" * 5000, "[" + "9" * 5000 + "]", '{"size": ' + "[" * 5000 + "]" * 5000 + "}"]


@pytest.mark.parametrize("text", HOSTILE_JSON, ids=["nested", "long-integer", "nested-field"])
def test_a_sidecar_nested_or_numbered_past_reason_is_refused_in_one_line(text: str, tmp_path: Path) -> None:
    from onnxcam_export.sources import labels_file, preprocess_file

    (tmp_path / "prep.json").write_text(text)
    with pytest.raises(OnnxcamError):
        preprocess_file(str(tmp_path / "prep.json"))
    with pytest.raises(OnnxcamError):
        labels_file(tmp_path / "prep.json")


@pytest.mark.parametrize("text", HOSTILE_JSON, ids=["nested", "long-integer", "nested-field"])
def test_a_model_card_field_nested_or_numbered_past_reason_is_one_line(text: str, lite0_model: Path,
                                                                       tmp_path: Path) -> None:  # fmt: skip
    import onnx

    model = onnx.load(lite0_model)
    next(p for p in model.metadata_props if p.key == "onnxcam.labels").value = text
    onnx.save(model, tmp_path / "forged.onnx")
    assert_clean_failure(run("info", str(tmp_path / "forged.onnx")), "labels")
