"""Hostile models and the dependency floors that keep them harmless."""

from __future__ import annotations

import re
from pathlib import Path

import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxcam.engine import Engine
from onnxcam.errors import OnnxcamError
from tests.conftest import ROOT


def _escaping_model(location: str) -> bytes:
    """An Identity graph whose only weight is 'external data' at ``location``."""
    weight = TensorProto(name="w", data_type=TensorProto.UINT8, dims=[16], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [16])], [weight])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_a_model_cannot_read_files_outside_its_folder(kind: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    location = {"dotdot": "../../secret.txt", "absolute": str(secret), "symlink": "w.bin"}[kind]
    if kind == "symlink":
        (folder / "w.bin").symlink_to(secret)
    (folder / "m.onnx").write_bytes(_escaping_model(location))
    with pytest.raises(OnnxcamError, match=r"could not load model .*External data"):
        Engine(folder / "m.onnx")
    with pytest.raises(Exception, match="External data"):
        ort.InferenceSession(_escaping_model(location), providers=["CPUExecutionProvider"])


def _floor(requirements: list[str], name: str) -> tuple[int, ...]:
    spec = next(r for r in requirements if re.match(rf"{name}\b", r))
    return tuple(int(p) for p in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))


def test_dependency_floors_exclude_the_known_unsafe_releases() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _floor(project["dependencies"], "onnxruntime") >= (1, 24, 4)
    assert _floor(project["optional-dependencies"]["export"], "torch") >= (2, 6)
    assert _floor(project["optional-dependencies"]["export"], "onnx") >= (1, 21)
