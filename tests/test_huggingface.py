"""Hugging Face image classifiers exported as HF users export them (``optimum``'s ONNX exporter, which leaves
every input axis symbolic and writes ``config.json`` and ``preprocessor_config.json`` beside the file),
grafted with no flag: labels, size, resize, rescale, normalisation and channel order all come from the
sidecars, and the explained prediction is the pipeline's own: the same top-5 classes in the same order as
``AutoImageProcessor`` + the torch model on the same photo, probabilities within 1e-3.

Runs where transformers and optimum import (a venv with torch and torchvision of matching releases: see the
README); skipped elsewhere, with the reason. Models are small configs with seeded random weights; batch
norms take the statistics of random images, so the scores are not degenerate.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam.image import read_rgb
from onnxcam_export.from_onnx import graft_file

try:
    import torch
    import transformers
    from optimum.exporters.onnx import main_export
    from PIL import Image
except Exception as exc:  # ImportError, or torchvision's operator errors when releases do not match
    pytest.skip(f"transformers/optimum do not import here ({type(exc).__name__}: {exc})"[:300],
                allow_module_level=True)  # fmt: skip

pytestmark = pytest.mark.slow
PHOTO = Path(__file__).parents[1] / "examples" / "chelsea.png"  # 451x300: every convention crops or pads it
SMALL = {"hidden_act": "gelu", "num_labels": 10}

# name -> (config, model class, image processor with the settings its checkpoints ship), each a different convention
CASES = {
    "vit": (transformers.ViTConfig(image_size=224, patch_size=32, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=128, **SMALL),
            transformers.ViTForImageClassification, transformers.ViTImageProcessor()),  # 224x224 stretch, 0.5
    "deit": (transformers.DeiTConfig(image_size=224, patch_size=32, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128, **SMALL),
             transformers.DeiTForImageClassification, transformers.DeiTImageProcessor()),  # 256x256, crop, bicubic
    "resnet": (transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], **SMALL),
               transformers.ResNetForImageClassification,
               transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875,
                                                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])),
    "mobilevit": (transformers.MobileViTConfig(image_size=256, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24,
                                               32, 48, 64, 80], **SMALL),
                  transformers.MobileViTForImageClassification,
                  transformers.MobileViTImageProcessor()),  # shorter side 224, crop 256, BGR, no normalisation
}  # fmt: skip


def _calibrate(model: torch.nn.Module) -> None:
    """Batch norms take the statistics of random images and unit scales (some of HF's inits draw the scales from
    N(0, 0.02), and the activations fade layer by layer)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None
        norm.reset_parameters()
    if norms:
        size = getattr(model.config, "image_size", 224)
        with torch.no_grad():
            model.train()(torch.randn(8, 3, size, size))
    model.eval()
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == model.config.num_labels]
    with torch.no_grad():  # the heads' weights larger, so that the classes' probabilities differ
        for head in heads:
            head.weight.mul_(30)


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    name = request.param
    config, cls, processor = CASES[name]
    config.id2label = {i: f"{name} kind {i}" for i in range(10)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    folder = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model = cls(config)
    _calibrate(model)
    model.save_pretrained(folder / "hub")
    processor.save_pretrained(folder / "hub")
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), quiet[0], quiet[1]:
        warnings.simplefilter("ignore")
        main_export(str(folder / "hub"), output=folder / "onnx", task="image-classification", no_post_process=True)
    return name, folder


def test_an_optimum_export_grafts_with_no_flag_and_predicts_as_its_pipeline(exported: tuple[str, Path]) -> None:
    name, folder = exported
    card, _ = graft_file(folder / "onnx" / "model.onnx", folder / "model.cam.onnx")
    assert not [fact for fact, source in card["sources"].items() if source == "assumed"], card["sources"]
    explainer = Explainer(folder / "model.cam.onnx")
    assert explainer.labels[3] == f"{name} kind 3"
    photo = read_rgb(PHOTO)
    processor = transformers.AutoImageProcessor.from_pretrained(folder / "hub")
    model = transformers.AutoModelForImageClassification.from_pretrained(folder / "hub").eval()
    with torch.no_grad():
        logits = model(**processor(images=Image.fromarray(photo), return_tensors="pt")).logits[0].double()
    expected = torch.softmax(logits, 0).numpy()
    top = np.argsort(-expected)[:5]
    found = explainer.explain(photo).predictions
    assert [p.index for p in found] == list(top), name
    np.testing.assert_allclose([p.probability for p in found], expected[top], atol=1e-3)
    assert expected[top[0]] - expected[top[4]] > 0.01, "the scores are degenerate: the test would prove nothing"
    pixels = processor(images=Image.fromarray(photo), return_tensors="np")["pixel_values"][0]
    card = explainer.card
    ours = explainer.prepare(photo).model_input.astype(np.float64)
    order = slice(None, None, -1 if card.notes.endswith("receives BGR channels") else 1)  # the model's channels
    ours = (ours[:, :, order] / 255 - np.asarray(card.mean)[order]) / np.asarray(card.std)[order]
    scale = np.asarray(card.std).min() * 255
    assert np.abs(ours - pixels.transpose(1, 2, 0)).max() * scale < 1e-3, "the pixels differ from the processor's"
