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
    assert [o.name for o in model.graph.output] == [*contract.OUTPUTS, contract.HEAD_LOGITS, contract.SALIENCY]
    assert {i.name for i in model.graph.input} == {
        contract.IMAGE, contract.TARGETS, contract.FULL_GRADIENTS, contract.HEAD_ACTIVATIONS, contract.RUN_HEAD,
        contract.RETURN_SALIENCY, contract.SALIENCY_METHOD,
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


BROKEN_CARDS = {
    "labels not JSON": ({"labels": "cat, dog"}, "field 'labels' is not valid JSON"),
    "fewer labels than classes": ({"labels": '["a", "b"]'}, "names 2 classes but the model scores 5"),
    "labels not names": ({"labels": "[1, 2, 3, 4, 5]"}, "'labels' must be a non-empty list of class names"),
    "input size zero": ({"input_size": "[0, 0]"}, "'input_size' must be [height, width]"),
    "input size text": ({"input_size": '"abc"'}, "'input_size' must be [height, width]"),
    "input size huge": ({"input_size": "[5000, 5000]"}, "two integers from 1 to 4096"),
    "input size not the graph's": ({"input_size": "[64, 64]"}, "says input size [64, 64] but the graph takes [32, 32]"),
    "mean of two": ({"mean": "[0.5, 0.5]"}, "'mean' must be three finite numbers"),
    "std zero": ({"std": "[0, 1, 1]"}, "'std' must be three finite numbers > 0"),
    "unknown weights path": ({"weights_path": "magic"}, "'weights_path' must be one of"),
    "trained not a bool": ({"trained": '"yes"'}, "'trained' must be true or false"),
    "unknown score": ({"score": "softmax"}, "'score' must be one of ('logit', 'probability', 'value')"),
    "layer missing": ({"layer": None}, "lacks the field 'layer'"),
}


@pytest.mark.parametrize("case", BROKEN_CARDS)
def test_a_malformed_model_card_is_one_line_naming_the_field(case: str, tmp_path: Path) -> None:
    from tests.test_cli import assert_clean_failure, run
    from tests.test_passes import build_tiny

    changes, phrase = BROKEN_CARDS[case]
    model = onnx.load(build_tiny(tmp_path))
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in changes.items():
        props.pop(contract.META_PREFIX + key)
        if value is not None:
            props[contract.META_PREFIX + key] = value
    del model.metadata_props[:]
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in props.items())
    onnx.save(model, tmp_path / "broken.onnx")
    assert_clean_failure(run("info", str(tmp_path / "broken.onnx")), "broken.onnx", phrase)


def test_the_card_round_trips_through_metadata() -> None:
    card = contract.ModelCard(arch="a", weights="w", layer="l", input_size=(32, 48), mean=(0.1, 0.2, 0.3),
                              std=(1, 1, 1), labels=("x", "y"), weights_path="presummed", trained=False)  # fmt: skip
    assert contract.ModelCard.from_metadata(card.to_metadata(), "m") == card
