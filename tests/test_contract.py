"""The exported file: valid ONNX, default domain only, and self-describing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from onnxcam import contract
from onnxcam.engine import Engine
from tests.conftest import ROOT

pytest.importorskip("torch")


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


@pytest.mark.parametrize("fixture", ["vgg16_model", "lite0_model"])
def test_graph_is_valid_and_uses_only_the_default_domain(fixture: str, request: pytest.FixtureRequest) -> None:
    model = onnx.load(request.getfixturevalue(fixture))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert {n.domain for n in _all_nodes(model.graph)} <= {"", "ai.onnx"}
    assert [o.name for o in model.graph.output] == [*contract.OUTPUTS, contract.HEAD_LOGITS]
    assert {i.name for i in model.graph.input} == {
        contract.IMAGE, contract.TARGETS, contract.FULL_GRADIENTS, contract.HEAD_ACTIVATIONS, contract.RUN_HEAD
    }  # fmt: skip


def test_model_card_describes_the_model(vgg16_model: Path, lite0_model: Path) -> None:
    labels = (ROOT / "onnxcam" / "data" / "imagenet_classes.txt").read_text().splitlines()
    vgg, lite = Engine(vgg16_model).card, Engine(lite0_model).card
    assert vgg.arch == "vgg16" and "NOT TRAINED" in vgg.weights
    assert vgg.layer == "block5_conv3 (features.29)"
    assert lite.weights.startswith("imagenet")
    assert vgg.input_size == (224, 224) and vgg.channel_order == "RGB"
    assert vgg.mean == (0.485, 0.456, 0.406) and vgg.std == (0.229, 0.224, 0.225)
    assert list(vgg.labels) == labels and len(labels) == 1000 and labels[281] == "tabby"
    assert vgg.weights_path == lite.weights_path == "presummed"


def test_vgg16_target_layer_is_block5_conv3(vgg16_model: Path) -> None:
    outputs = {o.name: o for o in onnx.load(vgg16_model, load_external_data=False).graph.output}
    dims = [d.dim_value or d.dim_param for d in outputs[contract.ACTIVATIONS].type.tensor_type.shape.dim]
    assert dims == ["N", 512, 14, 14]
