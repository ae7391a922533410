"""Hugging Face image classifiers (ViT, DeiT, BEiT, DINOv2, Swin, ResNet, RegNet, ConvNeXtV2, MobileViT) and DETR
exported as HF users export them (``optimum``'s ONNX exporter, which leaves
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
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam.image import read_rgb
from onnxcam_export.from_onnx import graft_file
from tests.graph_fd import finite_difference

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
    "beit": (transformers.BeitConfig(image_size=224, patch_size=32, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128, **SMALL),
             transformers.BeitForImageClassification, transformers.BeitImageProcessor()),  # mean-pooled tokens
    "dinov2": (transformers.Dinov2Config(image_size=224, patch_size=28, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, **SMALL),
               transformers.Dinov2ForImageClassification,  # its input goes through a Cast; interpolated positions
               transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})),
    "convnextv2": (transformers.ConvNextV2Config(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], **SMALL),
                   transformers.ConvNextV2ForImageClassification,
                   transformers.ConvNextImageProcessor(size={"shortest_edge": 224})),  # crop_pct 0.875
    "swin": (transformers.SwinConfig(image_size=224, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=7,
                                     **SMALL),
             transformers.SwinForImageClassification, transformers.ViTImageProcessor()),
    "regnet": (transformers.RegNetConfig(hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, **SMALL),
               transformers.RegNetForImageClassification,
               transformers.ConvNextImageProcessor(size={"shortest_edge": 224})),
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


def optimum_export(model: torch.nn.Module, processor: object, folder: Path, task: str) -> None:
    """``folder/hub`` as ``save_pretrained`` writes it, and ``folder/onnx`` as optimum's exporter makes it (quiet)."""
    model.save_pretrained(folder / "hub")
    processor.save_pretrained(folder / "hub")
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), quiet[0], quiet[1]:
        warnings.simplefilter("ignore")
        main_export(str(folder / "hub"), output=folder / "onnx", task=task, no_post_process=True)


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
    optimum_export(model, processor, folder, "image-classification")
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
    grid = [int(d) for d in re.search(r"\((\d+)x(\d+)x(\d+)\)", card.layer).groups()[1:]]
    assert min(grid) >= 2, card.layer
    assert np.ptp(explainer.explain(photo).maps[0].cam) > 0, "a map that varies"
    if name == "vit":  # its float32 gradient is off by 2e-6 of its L1 mass (rounding through two attention blocks),
        return  # over this check's 1e-4 of one inner product where that cancels (1.1e-4); tests/test_transformers.py
        # checks ViT's gradients against torch autograd instead
    summary = {"layer": card.layer, "task": card.task}  # (the corpus check: the head's float64 finite difference)
    finite_difference(folder / "model.cam.onnx", summary, explainer.prepare(photo).model_input, np.array([[-1, 1]]))


def test_an_optimum_detr_export_grafts_with_a_dynamic_batch_and_gives_post_process_boxes(tmp_path: Path) -> None:
    """HF's DETR builds its sine position embedding from a mask of the input's shape (ConstantOfShape(Shape(x)),
    Resize, CumSum, Sin/Cos): shape-only, so no gradient flows through it, even with optimum's dynamic batch. The
    kept detections equal ``post_process_object_detection``'s (boxes clipped to the photo, as explain reports
    them), and a query's score gradient at the target layer equals torch autograd's."""
    from onnxcam.engine import Engine

    labels = {i: f"thing {i}" for i in range(5)}
    backbone = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                         out_features=["stage4"])  # fmt: skip
    config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                                     d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
                                     num_labels=5, id2label=labels, label2id={v: k for k, v in labels.items()},
                                     auxiliary_loss=False)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DetrForObjectDetection(config).eval()
    with torch.no_grad():  # spread-out scores and boxes
        model.model.query_position_embeddings.weight.mul_(50)
        model.class_labels_classifier.weight.mul_(10)
        for layer in model.bbox_predictor.layers:
            torch.nn.init.normal_(layer.weight, std=0.5)
    processor = transformers.DetrImageProcessor(size={"height": 256, "width": 256}, do_pad=False)
    optimum_export(model, processor, tmp_path, "object-detection")
    card, _ = graft_file(tmp_path / "onnx" / "model.onnx", tmp_path / "detr.cam.onnx")
    assert card["task"] == "detection" and card["layer"].startswith("/model/input_projection/Conv_output_0")
    photo = read_rgb(PHOTO)
    with torch.no_grad():
        out = model(**processor(images=Image.fromarray(photo), return_tensors="pt"))
    post = processor.post_process_object_detection(out, threshold=0.0, target_sizes=[photo.shape[:2]])[0]
    order = torch.argsort(post["scores"], descending=True)[:5]
    explainer = Explainer(tmp_path / "detr.cam.onnx")
    found = explainer.explain(photo, top_k=5, conf=0.0).maps
    edges = np.array([photo.shape[1], photo.shape[0]] * 2)
    for m, i in zip(found, order, strict=True):
        box = np.clip(post["boxes"][i].numpy(), 0, edges)
        inner = np.clip(np.minimum(m.box[2:], box[2:]) - np.maximum(m.box[:2], box[:2]), 0, None).prod()
        union = np.prod(np.subtract(m.box[2:], m.box[:2])) + np.prod(box[2:] - box[:2]) - inner
        assert inner / union >= 0.95 and m.index == int(post["labels"][i])
        assert abs(m.probability - float(post["scores"][i])) < 1e-3
    image = explainer.prepare(photo).model_input
    engine = Engine(tmp_path / "detr.cam.onnx")
    ran = engine.run(image[None], np.array([[-1, -2]]), full_gradients=True, thresholds={"conf_threshold": 0.0})
    store: list[torch.Tensor] = []
    model = model.double()
    model.model.input_projection.register_forward_hook(lambda _m, _i, o: store.append(o))
    pixels = (torch.from_numpy(image).permute(2, 0, 1)[None].double() / 255 - torch.tensor(card["mean"])[:, None,
              None]) / torch.tensor(card["std"])[:, None, None]  # fmt: skip
    logits = model(pixel_values=pixels).logits[0]
    for t in range(2):
        query, cls = int(ran.box_anchors[0, t]), int(ran.target_classes[0, t])
        score = torch.softmax(logits[query], 0)[cls]
        expected = torch.autograd.grad(score, store[0], retain_graph=True)[0][0].numpy()
        scale = np.abs(expected).max()
        np.testing.assert_allclose(ran.gradients[0, t], expected, rtol=1e-4, atol=1e-4 * scale)
